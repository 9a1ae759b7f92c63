//! The fuzz targets: hostile bytes into the crate's real parsers, each behind [`Target::run`].
//! Shared by the fuzzer (`examples/fuzz/main.rs`, which mutates inputs) and the regression test
//! (`tests/fuzz_regressions.rs`, which replays saved ones), so a saved input means the same
//! thing to both. Input formats are below, per target; they must stay stable, because saved
//! regression inputs are in them.
//!
//! | target | input | code under test |
//! |---|---|---|
//! | `token` | mode byte, then a token or a header/claims pair (see [`Token`]) | `Verifier::verify`, with every platform's issuer from `policies/ephemera.toml` on static keys |
//! | `jwks` | a JWKS document | `KeySet::parse`, for four sets of pinned algorithms |
//! | `policy` | one policy file (YAML) | `PolicySet::load_sources`; when it loads: `decide_claims`, `explain`, `lint_policy` against every claim fixture |
//! | `config` | a config file (TOML) | `Config::parse` |
//! | `webhook` | platform byte, event name, `0xFF`, body | `hook_format::{github, gitlab, buildkite}` |
//! | `journal` | a journal file | `journal::decode`, `decode_with`; re-encoded with `encode` and `SnapshotEncoder` |
//!
//! [`Target::run`] answers `Ok(label)`: a short name for what the input did (an error variant,
//! `ok`, …), which the fuzzer counts as a cheap coverage proxy; or `Err(why)`: an invariant
//! broke, which is a finding like a panic.

use ephemera::claims::{Claims, Platform};
use ephemera::clock::UnixSeconds;
use ephemera::config::{Config, IssuerConfig};
use ephemera::identity::{IdentityError, Verifier};
use ephemera::ids::{b64url, b64url_decode};
use ephemera::ledger::journal::{SnapshotEncoder, decode, decode_with, encode};
use ephemera::ledger::{Event, FileStore, FileStoreOptions, Lease, LeaseCredential, LeaseStore};
use ephemera::policy::{LoadContext, PolicySet, Source};
use jsonwebtoken::Algorithm;
use ring::signature::{self, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

pub const NAMES: [&str; 6] = ["token", "jwks", "policy", "config", "webhook", "journal"];

/// The claim fixtures' clock (`iat` of most of `policies/tests/claims/`).
pub const NOW: UnixSeconds = 1_787_166_757;

pub trait Target {
    /// Real inputs from the repository: files, signed tokens, a journal the `FileStore` wrote.
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// Runs one input: `Ok(label)`, or `Err(why)` when an invariant broke.
    fn run(&self, input: &[u8]) -> Result<String, String>;
}

/// The target called `name`, set up (keys, issuers, fixtures).
pub fn target(name: &str) -> Option<Box<dyn Target>> {
    Some(match name {
        "token" => Box::new(Token::new()),
        "jwks" => Box::new(Jwks::new()),
        "policy" => Box::new(Policy::new()),
        "config" => Box::new(ConfigTarget),
        "webhook" => Box::new(Webhook),
        "journal" => Box::new(Journal),
        _ => return None,
    })
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every file in `dir` (relative to the repository) whose name ends in `ext`, sorted.
fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo_path(dir))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.retain(|p| p.is_file() && p.to_string_lossy().ends_with(ext));
    out.sort();
    out
}

/// The code blocks of `lang` in a Markdown file.
fn code_blocks(rel: &str, lang: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&read(rel)).into_owned();
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_start() == format!("```{lang}") => current = Some(String::new()),
            Some(block) if line.trim_start() == "```" => {
                out.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

/// A short, bounded name for an error text: its last line, with digits and double-quoted text
/// (caller values, which serde quotes with escapes) taken out, cut at the first backtick (what
/// follows one is a caller's value or a list of names, and a caller's value may hold a backtick
/// itself) and at 60 characters.
pub fn shape(text: &str) -> String {
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let mut out = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in line.chars() {
        match quote {
            // Inside a quoted value (serde quotes with Debug escapes: `\"`, `\u{…}`).
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None if c == '`' => {
                out.push_str("`…");
                break;
            }
            None if c == '"' => {
                out.push(c);
                quote = Some(c);
            }
            None if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            None => out.push(c),
        }
        if out.chars().count() >= 60 {
            break;
        }
    }
    out
}

/// Polls a future that never waits (a verifier on static keys) to its end.
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// The claim fixtures of every platform (`policies/tests/claims/`, the GitHub and GitLab ones
/// copied from `../shared/fixtures/claims/`): (file name, claims).
pub fn claim_fixtures() -> Vec<(String, Claims)> {
    files("policies/tests/claims", ".json")
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            (name, serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap())
        })
        .collect()
}

/// `policies/ephemera.toml`: an issuer of every platform, as the example policies name them.
pub fn example_config() -> Config {
    let text = String::from_utf8(read("policies/ephemera.toml")).unwrap();
    Config::parse(&text, &repo_path("policies")).unwrap()
}

// ---- token -----------------------------------------------------------------------------------

/// `Verifier::verify` for every issuer of `policies/ephemera.toml`, each on a static key set
/// (no network) holding the test keys `rsa-a` and `rsa-b` (`tests/fixtures/keys/`) and an
/// Ed25519 key `ed-a` (from a fixed seed), with `EdDSA` pinned beside the configured algorithms:
/// Ed25519 signs in tens of µs where RSA-2048 takes a millisecond, so most structured inputs get
/// past the signature at the fuzzer's pace, and some are RS256 as the platforms sign.
///
/// Input: the first byte is the mode.
/// - `R`, `B`, `E`: structured. The rest is the header JSON, `0xFF`, the claims JSON (any bytes:
///   they are base64url-encoded as they are); the harness signs `header.payload` with `rsa-a`
///   (RS256), `rsa-b` (RS256) or `ed-a` (EdDSA), so the token reaches the claim checks and the
///   job key whenever the header names the signing key and algorithm.
/// - anything else: the rest is the token text itself (invalid UTF-8 replaced).
pub struct Token {
    verifier: Verifier,
    issuers: Vec<IssuerConfig>,
    rsa: [(String, RsaKeyPair); 2],
    ed: Ed25519KeyPair,
    /// The static key sets are read from files.
    _dir: tempfile::TempDir,
}

/// The Ed25519 key's seed: fixed, so structured inputs sign the same in every run.
const ED_SEED: [u8; 32] = [0x42; 32];

impl Token {
    pub fn new() -> Token {
        ephemera::install_crypto();
        let rsa = ["rsa-a", "rsa-b"].map(|name| {
            (name.to_string(), RsaKeyPair::from_pkcs8(&read(&format!("tests/fixtures/keys/{name}.pk8"))).unwrap())
        });
        let ed = Ed25519KeyPair::from_seed_unchecked(&ED_SEED).unwrap();
        let n = |name: &str| String::from_utf8(read(&format!("tests/fixtures/keys/{name}.n"))).unwrap();
        let jwks = json!({"keys": [
            {"kty": "RSA", "kid": "rsa-a", "use": "sig", "alg": "RS256", "n": n("rsa-a").trim(), "e": "AQAB"},
            {"kty": "RSA", "kid": "rsa-b", "n": n("rsa-b").trim(), "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-a", "alg": "EdDSA", "x": b64url(ed.public_key().as_ref())},
        ]});
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks.to_string()).unwrap();
        let mut issuers = example_config().issuers;
        for issuer in &mut issuers {
            issuer.jwks_file = Some(path.clone());
            issuer.jwks_url = None;
            if !issuer.algorithms.contains(&Algorithm::EdDSA) {
                issuer.algorithms.push(Algorithm::EdDSA);
            }
        }
        let clock: Arc<dyn ephemera::clock::Clock> = Arc::new(ephemera::clock::ManualClock::new(NOW));
        let verifier = Verifier::new(&issuers, &ephemera::identity::jwks::http_client(), &clock).unwrap();
        Token { verifier, issuers, rsa, ed, _dir: dir }
    }

    /// `header.payload.signature` for a structured input.
    fn signed(&self, mode: u8, header: &[u8], claims: &[u8]) -> String {
        let message = format!("{}.{}", b64url(header), b64url(claims));
        let signature = match mode {
            b'E' => self.ed.sign(message.as_bytes()).as_ref().to_vec(),
            _ => {
                let pair = &self.rsa[usize::from(mode == b'B')].1;
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), message.as_bytes(), &mut sig)
                    .unwrap();
                sig
            }
        };
        format!("{message}.{}", b64url(&signature))
    }

    /// A fixture's claims stamped for the configured issuer of its platform at [`NOW`].
    fn stamped(&self, file: &str, mut claims: Claims) -> Option<Claims> {
        let platform = match file.split('-').next()? {
            "github" => Platform::GithubActions,
            "gitlab" => Platform::GitlabCi,
            "buildkite" => Platform::Buildkite,
            "circleci" => Platform::Circleci,
            "azure" => Platform::AzurePipelines,
            "bitbucket" => Platform::Bitbucket,
            "jenkins" => Platform::Jenkins,
            _ => return None,
        };
        let issuer = self.issuers.iter().find(|i| i.platform == platform)?;
        claims.insert("iss".into(), json!(issuer.url));
        claims.insert("aud".into(), json!(issuer.audiences.first()?));
        claims.insert("iat".into(), json!(NOW));
        claims.insert("nbf".into(), json!(NOW));
        claims.insert("exp".into(), json!(NOW + 300));
        Some(claims)
    }

    /// The structured input for `header` and `claims`, signed in `mode`.
    pub fn structured(mode: u8, header: &Value, claims: &Value) -> Vec<u8> {
        let mut input = vec![mode];
        input.extend_from_slice(header.to_string().as_bytes());
        input.push(0xFF);
        input.extend_from_slice(claims.to_string().as_bytes());
        input
    }

    /// Does this signature verify over `message` with one of the test keys, checked by ring
    /// alone (not through jsonwebtoken, which the verifier uses)?
    fn signed_by_a_test_key(&self, alg: &str, message: &[u8], signature: &[u8]) -> bool {
        match alg {
            "RS256" => self.rsa.iter().any(|(_, pair)| {
                signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, pair.public().as_ref())
                    .verify(message, signature)
                    .is_ok()
            }),
            "EdDSA" => signature::UnparsedPublicKey::new(&signature::ED25519, self.ed.public_key().as_ref())
                .verify(message, signature)
                .is_ok(),
            _ => false,
        }
    }

    /// The invariants of an accepted token. Forgery: nothing but a test key's signature over
    /// exactly `header.payload` is accepted, under the algorithm the header names. Claim
    /// smuggling: the identity's claims are exactly the signed payload's. Job-key forgery: the
    /// key has the platform's shape, with no extra `:`-separated part a claim could inject.
    fn check_accepted(&self, token: &str, identity: &ephemera::identity::VerifiedIdentity) -> Result<(), String> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("accepted a token that is not three parts".into());
        };
        // The header as the verifier reads it: `alg`, other members skipped unparsed (an
        // unknown member may hold what a `Value` cannot, such as `-1e309`).
        #[derive(serde::Deserialize)]
        struct Alg {
            alg: String,
        }
        let alg = b64url_decode(header)
            .and_then(|b| serde_json::from_slice::<Alg>(&b).ok())
            .ok_or("accepted a token whose header has no `alg`")?
            .alg;
        let message = &token.as_bytes()[..token.len() - sig.len() - 1];
        let signature = b64url_decode(sig).ok_or("accepted a signature that is not base64url")?;
        if !self.signed_by_a_test_key(&alg, message, &signature) {
            return Err(format!("accepted a token ({alg}) that no test key signed"));
        }
        let claims: Claims = b64url_decode(payload)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("accepted a payload that is not a JSON object")?;
        if identity.claims() != &claims {
            return Err("the identity's claims differ from the signed payload".into());
        }
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.name == identity.issuer())
            .ok_or("the identity names an issuer that is not configured")?;
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.url.as_str()) {
            return Err("the identity's issuer is not the token's `iss`".into());
        }
        if identity.expires_at() + issuer.leeway_secs <= NOW + 10 {
            return Err("accepted an expired token".into());
        }
        let job = identity.job();
        let segments: Vec<&str> = job.split(':').collect();
        let (prefix, parts): (&str, &[usize]) = match issuer.platform {
            Platform::GithubActions => ("github", &[4, 5]),
            Platform::GitlabCi => ("gitlab", &[3]),
            Platform::Buildkite => ("buildkite", &[2]),
            Platform::Circleci => ("circleci", &[2]),
            Platform::AzurePipelines => ("azure-pipelines", &[3]),
            Platform::Bitbucket => ("bitbucket", &[2]),
            Platform::Jenkins | Platform::Generic => (issuer.platform.as_str(), &[]),
        };
        let expected = match parts {
            [] => vec![1 + issuer.job_key.claims.len()],
            some => some.to_vec(),
        };
        if segments.first() != Some(&prefix)
            || !expected.contains(&segments.len())
            || segments.iter().any(|s| s.is_empty())
        {
            return Err(format!("job key of the wrong shape for {}: {job:?}", issuer.platform.as_str()));
        }
        Ok(())
    }
}

impl Default for Token {
    fn default() -> Self {
        Token::new()
    }
}

fn identity_error_label(e: &IdentityError) -> String {
    use IdentityError::*;
    match e {
        Malformed(what) => format!("Malformed({what})"),
        ForbiddenHeader(h) => format!("ForbiddenHeader({h})"),
        MissingClaim(c) => format!("MissingClaim({c})"),
        BadClaimType(c) => format!("BadClaimType({c})"),
        other => format!("{other:?}").split(['(', ' ', '{']).next().unwrap_or_default().to_string(),
    }
}

impl Target for Token {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        let header = |alg: &str, kid: &str| json!({"alg": alg, "typ": "JWT", "kid": kid});
        let mut github = None;
        for (file, claims) in claim_fixtures() {
            let Some(claims) = self.stamped(&file, claims) else { continue };
            let claims = Value::Object(claims);
            seeds.push(Token::structured(b'E', &header("EdDSA", "ed-a"), &claims));
            if file.starts_with("github-push") || file.starts_with("gitlab-protected") {
                seeds.push(Token::structured(b'R', &header("RS256", "rsa-a"), &claims));
                let mut raw = vec![b'T'];
                raw.extend_from_slice(
                    self.signed(b'R', header("RS256", "rsa-a").to_string().as_bytes(), claims.to_string().as_bytes())
                        .as_bytes(),
                );
                seeds.push(raw);
                github.get_or_insert(claims);
            }
        }
        // A generic issuer's token (the agents' SPIRE issuer): the job key is the configured claim.
        let agents = self.issuers.iter().find(|i| i.platform == Platform::Generic);
        if let Some(agents) = agents {
            let claims = json!({"iss": agents.url, "aud": agents.audiences.first(), "sub": "spiffe://ci.example/agent/reviewer",
                                "iat": NOW, "exp": NOW + 300, "jti": "a1"});
            seeds.push(Token::structured(b'E', &header("EdDSA", "ed-a"), &claims));
        }
        // Header attacks, each on a real claim set: key injection, `crit`, `none`, HMAC
        // confusion, a missing or unknown `kid`, a key of another family, another key's `kid`.
        let claims = github.unwrap_or_else(|| json!({}));
        for header in [
            json!({"alg": "none", "kid": "rsa-a"}),
            json!({"alg": "HS256", "kid": "rsa-a"}),
            json!({"alg": "RS256", "kid": "rsa-a", "jku": "https://169.254.169.254/keys"}),
            json!({"alg": "RS256", "kid": "rsa-a", "jwk": {"kty": "oct", "k": "c2VjcmV0"}}),
            json!({"alg": "RS256", "kid": "rsa-a", "x5c": ["MIIB"]}),
            json!({"alg": "RS256", "kid": "rsa-a", "crit": ["exp"]}),
            json!({"alg": "RS256"}),
            json!({"alg": "RS256", "kid": "no-such-key"}),
            json!({"alg": "EdDSA", "kid": "rsa-a"}),
            json!({"alg": "PS256", "kid": "rsa-a"}),
            json!({"alg": "ES256", "kid": "ed-a"}),
        ] {
            seeds.push(Token::structured(b'E', &header, &claims));
        }
        seeds.push(Token::structured(b'B', &header("RS256", "rsa-a"), &claims));
        for raw in ["", "a", "a.b", "a.b.c", "a.b.c.d.e", "..", "eyJhbGciOiJub25lIn0.e30.", "eyJ9.eyJ9.eyJ9"] {
            let mut input = vec![b'T'];
            input.extend_from_slice(raw.as_bytes());
            seeds.push(input);
        }
        seeds
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let (mode, rest) = input.split_first().map_or((b'T', &[][..]), |(m, r)| (*m, r));
        let token = match mode {
            b'R' | b'B' | b'E' => {
                let (header, claims) = match rest.iter().position(|b| *b == 0xFF) {
                    Some(at) => (&rest[..at], &rest[at + 1..]),
                    None => (rest, &[][..]),
                };
                self.signed(mode, header, claims)
            }
            _ => String::from_utf8_lossy(rest).into_owned(),
        };
        // Structured inputs are one kind whichever key signed them: RSA's share stays small
        // only if an RS256 input earns no corpus place for its mode alone.
        let mode = if matches!(mode, b'R' | b'B' | b'E') { 'S' } else { 'T' };
        match now_or_never(self.verifier.verify(&token, NOW + 10)) {
            Ok(identity) => {
                self.check_accepted(&token, &identity)?;
                Ok(format!("{mode} ok {}", identity.platform().as_str()))
            }
            Err(e) => Ok(format!("{mode} {}", identity_error_label(&e))),
        }
    }
}

// ---- jwks ------------------------------------------------------------------------------------

/// `KeySet::parse` with four sets of pinned algorithms. Input: the document.
pub struct Jwks {
    /// The RSA test keys' moduli, for the seeds.
    moduli: [String; 2],
}

const PINNED: [&[Algorithm]; 4] = [
    &[Algorithm::RS256],
    &[Algorithm::ES256, Algorithm::ES384],
    &[Algorithm::EdDSA],
    &[Algorithm::RS256, Algorithm::PS256, Algorithm::RS512, Algorithm::ES256, Algorithm::EdDSA],
];

/// A P-256 public key (x, y), made for these seeds.
const EC_X: &str = "fMBCc3PjleRhGJL1EIx-Ox_e8AxyFAnXXMNN_SwOIG4";
const EC_Y: &str = "VPKqcCeh2IhwXyaQrbicpUOtMVNiJN5nhwy8LPPQegU";

impl Jwks {
    pub fn new() -> Jwks {
        let n =
            |name: &str| String::from_utf8(read(&format!("tests/fixtures/keys/{name}.n"))).unwrap().trim().to_string();
        Jwks { moduli: [n("rsa-a"), n("rsa-b")] }
    }
}

impl Default for Jwks {
    fn default() -> Self {
        Jwks::new()
    }
}

impl Target for Jwks {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let ed = Ed25519KeyPair::from_seed_unchecked(&ED_SEED).unwrap();
        let [a, b] = &self.moduli;
        let docs = [
            // Shaped like GitHub's: RSA keys with x5c/x5t, `use` and `alg`.
            json!({"keys": [
                {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "rsa-a", "n": a, "e": "AQAB",
                 "x5c": ["MIIDrDCCApSgAwIBAgIQ"], "x5t": "ykNaY4qM_ta4k2TgZOCEYLkcYlA"},
                {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "rsa-b", "n": b, "e": "AQAB"},
            ]}),
            // Shaped like GitLab's: no `alg` on some keys.
            json!({"keys": [{"kty": "RSA", "kid": "gl-1", "e": "AQAB", "n": a, "use": "sig"},
                            {"kty": "RSA", "kid": "gl-2", "e": "AQAB", "n": b, "use": "sig", "alg": "RS256"}]}),
            json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "ec-1", "x": EC_X, "y": EC_Y, "alg": "ES256"},
                            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-a", "x": b64url(ed.public_key().as_ref())}]}),
            // What must never load: symmetric keys, encryption keys, unknown types and curves.
            json!({"keys": [{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
                            {"kty": "RSA", "kid": "enc", "use": "enc", "n": a, "e": "AQAB"},
                            {"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": EC_X, "y": EC_Y},
                            {"kty": "OKP", "crv": "X25519", "kid": "x", "x": "AA"}]}),
            json!({"keys": []}),
        ];
        let mut seeds: Vec<Vec<u8>> = docs.iter().map(|d| d.to_string().into_bytes()).collect();
        seeds.push(read("policies/jenkins-jwks.example.json"));
        seeds
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        // What the document offers: keys of a type that may load at all. `oct` and unknown
        // types never load, so a set of only those must be refused (a published shared
        // secret would let anyone sign).
        // Only an object's `keys` count: serde would read the document's struct from an array
        // of its fields too (`[[key, …]]`), and `KeySet::parse` refuses that form.
        let loadable = serde_json::from_slice::<Value>(input).ok().map(|doc| {
            doc.get("keys").and_then(Value::as_array).map_or(0, |keys| {
                keys.iter()
                    .filter(|k| matches!(k.get("kty").and_then(Value::as_str), Some("RSA" | "EC" | "OKP")))
                    .count()
            })
        });
        let mut label = Vec::new();
        for allowed in PINNED {
            match ephemera::identity::jwks::KeySet::parse(input, allowed) {
                Ok(set) => {
                    if set.is_empty() || set.len() > 64 || loadable.is_some_and(|n| set.len() > n) {
                        return Err(format!("a key set of {} keys from {loadable:?} loadable ones", set.len()));
                    }
                    label.push(format!("ok{}", set.len().min(3)));
                }
                Err(e) => label.push(shape(&e.to_string()).chars().take(24).collect()),
            }
        }
        Ok(label.join(" | "))
    }
}

// ---- policy ----------------------------------------------------------------------------------

/// One policy file through the loader, against the issuers of `policies/ephemera.toml` and a
/// backend of every kind; when it loads, its decision, trace and lints for every claim fixture.
/// Input: the YAML (invalid UTF-8 replaced: the admin diff API receives JSON strings).
pub struct Policy {
    ctx: LoadContext,
    issuers: Vec<IssuerConfig>,
    fixtures: Vec<Claims>,
}

impl Policy {
    pub fn new() -> Policy {
        let config = example_config();
        let fixtures = claim_fixtures().into_iter().map(|(_, c)| c).collect();
        Policy { ctx: Policy::context(&config), issuers: config.issuers, fixtures }
    }

    /// What policies load against: `config`'s issuers and backends, plus a backend of every
    /// kind under the names the example policies and the docs use.
    pub fn context(config: &Config) -> LoadContext {
        let mut ctx = LoadContext::from_config(config);
        for (name, kind) in [
            ("aws", "aws"),
            ("aws-prod", "aws"),
            ("gh", "github-app"),
            ("db", "postgres"),
            ("ssh", "ssh"),
            ("ssh-prod", "ssh"),
        ] {
            ctx.backends.insert(name.to_string(), (kind, 3600));
        }
        ctx
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new()
    }
}

impl Target for Policy {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds: Vec<Vec<u8>> = files("policies", ".yaml").iter().map(|p| std::fs::read(p).unwrap()).collect();
        seeds.extend(files("tests/fixtures/policies/invalid", ".yaml").iter().map(|p| std::fs::read(p).unwrap()));
        for doc in ["docs/policy.md", "docs/platforms.md", "docs/token-exchange.md", "docs/aws.md", "docs/github.md"] {
            seeds
                .extend(code_blocks(doc, "yaml").into_iter().filter(|b| b.contains("issuer:")).map(String::into_bytes));
        }
        // The policies the integration tests use, written inline in tests/common.
        let common = String::from_utf8_lossy(&read("tests/common/mod.rs")).into_owned();
        for block in common.split("r#\"").skip(1) {
            if let Some((text, _)) = block.split_once("\"#")
                && text.contains("issuer:")
            {
                seeds.push(text.as_bytes().to_vec());
            }
        }
        seeds
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let text = String::from_utf8_lossy(input).into_owned();
        let source = Source { name: "fuzz".into(), file: PathBuf::from("fuzz.yaml"), text };
        let set = match PolicySet::load_sources(vec![source], &[], &self.ctx) {
            Ok(set) => set,
            Err(errors) => {
                let first = errors.first().map(|e| format!("{} {}", e.rule, shape(&e.message))).unwrap_or_default();
                return Ok(format!("err {first} (+{})", errors.len().saturating_sub(1).min(3)));
            }
        };
        let policy = set.get("fuzz").ok_or("a loaded set without the policy it loaded")?;
        // How many fixtures it allows and which denials it gives, not which fixture got which:
        // eleven fixtures in every combination would make every edit an outcome of its own.
        let (mut allowed, mut denials) = (0, BTreeSet::new());
        for claims in &self.fixtures {
            let issuer = policy.claims_issuer(claims, &self.issuers);
            let trace = policy.explain(&issuer, claims);
            // The trace is computed rule by rule, apart from `evaluate`: a policy check whose
            // trace says allow while the exchange denies (or the reverse) would mislead an
            // operator asking why.
            let every_rule_passes = trace.issuer.pass && trace.rules.iter().all(|r| r.pass);
            if (trace.decision == "allow") != every_rule_passes {
                return Err(format!("explain says {} but its rules say {every_rule_passes}", trace.decision));
            }
            let _ = trace.render();
            match set.decide_claims("fuzz", &issuer, claims, None) {
                Ok(_) => allowed += 1,
                Err(d) => {
                    denials.insert(
                        format!("{:?}", d.reason).split([' ', '{', '(']).next().unwrap_or_default().to_string(),
                    );
                }
            }
            let _ = set.decide_claims("fuzz", &issuer, claims, Some(60));
        }
        let lints = ephemera::policy::lint::lint_policy(policy, &self.ctx);
        let rules: BTreeSet<&str> = lints.iter().map(|f| f.rule).collect();
        Ok(format!("ok {allowed} allowed, denied {denials:?}, lints {rules:?}"))
    }
}

// ---- config ----------------------------------------------------------------------------------

/// `Config::parse`. Input: the TOML (invalid UTF-8 replaced).
pub struct ConfigTarget;

impl Target for ConfigTarget {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds =
            vec![read("docs/ephemera.example.toml"), read("deploy/ephemera.toml"), read("policies/ephemera.toml")];
        for doc in
            ["docs/deploy.md", "docs/aws.md", "docs/github.md", "docs/postgres.md", "docs/ssh.md", "docs/platforms.md"]
        {
            seeds.extend(code_blocks(doc, "toml").into_iter().map(String::into_bytes));
        }
        seeds
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let text = String::from_utf8_lossy(input);
        match Config::parse(&text, Path::new("/etc/ephemera")) {
            Ok(config) => {
                for issuer in &config.issuers {
                    // Algorithm confusion: HMAC (a shared secret the issuer's public key would
                    // be taken for) is refused by the config, whatever the file says.
                    if issuer.algorithms.iter().any(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac) {
                        return Err(format!("issuer {} pins an HMAC algorithm", issuer.name));
                    }
                    // SSRF: issuer and JWKS URLs are https (plain http only on loopback), no
                    // credentials, query or fragment.
                    for url in std::iter::once(&issuer.url).chain(issuer.jwks_url.as_ref()) {
                        if let Err(e) = ephemera::config::check_url(url) {
                            return Err(format!(
                                "issuer {}: a URL the config accepted fails check_url: {e}",
                                issuer.name
                            ));
                        }
                    }
                    if !(0..=60).contains(&issuer.leeway_secs) {
                        return Err(format!("issuer {}: leeway {} s", issuer.name, issuer.leeway_secs));
                    }
                }
                let kinds: BTreeSet<&str> = config.backends.values().map(|b| b.kind()).collect();
                Ok(format!("ok {} issuers {kinds:?}", config.issuers.len().min(4)))
            }
            Err(errors) => {
                let first = errors.first().map(|e| config_error_label(e)).unwrap_or_default();
                Ok(format!("err {first} (+{})", errors.len().saturating_sub(1).min(3)))
            }
        }
    }
}

/// A config error as `<first part of its path>.<last part>: <first words>` (`issuers[2] (ci).url:
/// must be https://…` → `issuers.url: must be`), keeping only plain lower-case words: the rest
/// (an issuer's name, a URL, a TOML snippet) is caller text, which would make every input an
/// outcome of its own.
fn config_error_label(error: &str) -> String {
    let plain =
        |w: &str| (1..=24).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-');
    let words = |text: &str| text.split(' ').take_while(|w| plain(w)).take(3).collect::<Vec<_>>().join(" ");
    // A TOML error ends with its message, after the source line it quotes: its first words.
    if error.starts_with("TOML parse error") {
        return words(error.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default());
    }
    // A validation error is one line (unless a value it quotes holds a newline).
    let line = error.lines().next().unwrap_or_default();
    let Some((head, message)) = line.split_once(": ") else { return words(line) };
    let root = head.split(['[', '.', ' ', '(']).next().unwrap_or_default();
    // `backends.<name>.<field>`: the second part is the operator's name.
    let last = match head.rsplit_once('.') {
        Some((before, _)) if root == "backends" && !before.contains('.') => "*",
        Some((_, last)) => last,
        None => "",
    };
    match (plain(root), plain(last) || last == "*") {
        (true, true) => format!("{root}.{last}: {}", words(message)),
        // An issuer's name held `: ` or `.`: what follows is no message of ours.
        (true, false) => format!("{root}.?"),
        _ => "?".to_string(),
    }
}

// ---- webhook ---------------------------------------------------------------------------------

/// `hook_format::{github, gitlab, buildkite}`. Input: a platform byte (`g`, `l`, `b`; any other
/// byte picks one by its value), the event header's value, `0xFF`, the body.
pub struct Webhook;

impl Webhook {
    pub fn input(platform: u8, event: &str, body: &Value) -> Vec<u8> {
        let mut input = vec![platform];
        input.extend_from_slice(event.as_bytes());
        input.push(0xFF);
        input.extend_from_slice(body.to_string().as_bytes());
        input
    }
}

impl Target for Webhook {
    fn seeds(&self) -> Vec<Vec<u8>> {
        // The bodies of tests/webhooks.rs, and fuller ones shaped like the platforms' own.
        let workflow_job = |action: &str| {
            json!({
                "action": action,
                "workflow_job": {
                    "id": 96_193_868_770u64, "run_id": 7_712_340_001u64, "run_attempt": 2, "status": action,
                    "conclusion": "success", "name": "deploy", "labels": ["ubuntu-latest"],
                    "head_sha": "9f3182061f1e2cca4702c368cbc039b7dc9d4485", "workflow_name": "CI",
                    "steps": [{"name": "Set up job", "status": "completed", "conclusion": "success", "number": 1,
                               "started_at": "2026-08-20T10:00:00Z", "completed_at": "2026-08-20T10:00:02Z"}],
                    "runner_id": 12, "runner_name": "GitHub Actions 12", "runner_group_id": 1,
                },
                "repository": {"id": 74, "full_name": "octo-org/octo-repo", "private": true, "owner": {"id": 65}},
                "organization": {"id": 65, "login": "octo-org"},
                "sender": {"login": "octocat", "id": 1},
            })
        };
        let gitlab_build = |status: &str| {
            json!({
                "object_kind": "build", "ref": "main", "tag": false, "build_id": 302, "build_name": "release",
                "build_stage": "deploy", "build_status": status, "build_started_at": "2026-08-20 10:00:00 UTC",
                "build_duration": 12.5, "build_allow_failure": false, "pipeline_id": 574, "project_id": 20,
                "project_name": "my-group / my-project", "user": {"id": 1, "name": "Administrator"},
                "repository": {"name": "my-project", "homepage": "https://gitlab.example.com/my-group/my-project"},
                "runner": {"id": 380987, "description": "shared-runners", "active": true, "tags": ["linux"]},
            })
        };
        let job_finished = |id: &str| {
            json!({"event": "job.finished", "job": {"id": id, "state": "passed", "exit_status": 0, "type": "script"},
                   "build": {"number": 1042, "branch": "main"}, "pipeline": {"slug": "web-deploy"},
                   "sender": {"name": "Buildkite"}})
        };
        let mut seeds = vec![
            Webhook::input(b'g', "workflow_job", &workflow_job("completed")),
            Webhook::input(b'g', "workflow_job", &workflow_job("in_progress")),
            Webhook::input(b'g', "ping", &json!({"zen": "Design for failure.", "hook_id": 1})),
            Webhook::input(b'g', "workflow_run", &workflow_job("completed")),
            Webhook::input(
                b'g',
                "workflow_job",
                &json!({"action": "completed", "workflow_job": {"id": "96193868770:x", "run_id": 7_712_340_001u64,
                        "run_attempt": 2}, "repository": {"id": 74}}),
            ),
            Webhook::input(b'l', "Job Hook", &gitlab_build("success")),
            Webhook::input(b'l', "Job Hook", &gitlab_build("running")),
            Webhook::input(
                b'l',
                "Pipeline Hook",
                &json!({"object_kind": "pipeline", "object_attributes": {"id": 574}}),
            ),
            Webhook::input(b'b', "job.finished", &job_finished("0184990a-477b-4fa8-9968-496074483cee")),
            Webhook::input(b'b', "job.finished", &job_finished("x:github:74:1:2:3")),
            Webhook::input(b'b', "ping", &json!({"event": "ping"})),
        ];
        seeds.push(b"g\xFFnot json at all: ghp_supersecretvalue".to_vec());
        seeds.push(b"l\xFF   ".to_vec());
        seeds
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let (platform, rest) = input.split_first().map_or((b'g', &[][..]), |(p, r)| (*p, r));
        let (event, body) = match rest.iter().position(|b| *b == 0xFF) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (&[][..], rest),
        };
        // The handlers read the header as text or as "" (`to_str().ok()`).
        let event = std::str::from_utf8(event).unwrap_or_default();
        use ephemera::hook_format::{self, HookAction, HookError};
        let which = match platform {
            b'g' => 0,
            b'l' => 1,
            b'b' => 2,
            other => other % 3,
        };
        let (name, result) = match which {
            0 => ("github", hook_format::github(event, body)),
            1 => ("gitlab", hook_format::gitlab(body)),
            _ => ("buildkite", hook_format::buildkite(event, body)),
        };
        match result {
            Ok(HookAction::Ignore(reason)) => Ok(format!("{name} ignore {reason}")),
            Ok(HookAction::EndJob(key)) => {
                // Job-key forgery: a body ends exactly one job of its own platform. The key is
                // the platform and numbers (GitHub, GitLab) or a lower-case UUID (Buildkite),
                // nothing a body could use to name another platform's or job's key.
                let segments: Vec<&str> = key.split(':').collect();
                let digits = |s: &&str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                let ok = match (name, segments.as_slice()) {
                    ("github", ["github", rest @ ..]) => rest.len() == 4 && rest.iter().all(digits),
                    ("gitlab", ["gitlab", rest @ ..]) => rest.len() == 2 && rest.iter().all(digits),
                    ("buildkite", ["buildkite", id]) => {
                        id.len() == 36
                            && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
                    }
                    _ => false,
                };
                if !ok {
                    return Err(format!("{name} webhook made the job key {key:?}"));
                }
                Ok(format!("{name} end"))
            }
            Err(HookError::Json(e)) => Ok(format!("{name} json {:?} {}", e.classify(), shape(&e.to_string()))),
            Err(HookError::NotABuildkiteJobId) => Ok(format!("{name} bad job id")),
            Err(HookError::NotAnObject) => Ok(format!("{name} not an object")),
        }
    }
}

// ---- journal ---------------------------------------------------------------------------------

/// `journal::decode` and `decode_with`; a journal that decodes is encoded again, as appends write
/// it (`encode`) and as compaction does (`SnapshotEncoder`), and must decode to the same events.
/// Input: the file.
pub struct Journal;

const MAGIC: &[u8] = b"EPHJRNL1";

impl Journal {
    /// Journals the real `FileStore` wrote: leases of several platforms issued (one renewable,
    /// with a replay key), renewed, revoked, failing to revoke, expired; the file before and
    /// after a compaction (which writes the dictionary form).
    pub fn written_by_the_file_store() -> Vec<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let options = FileStoreOptions { compact_bytes: 1, ..FileStoreOptions::default() };
            let store = FileStore::open(dir.path(), options, None).unwrap();
            let credential = |kind: &str, jti: &str| {
                json!({"name": "api", "kind": kind, "revocation": "immediate",
                       "handle": {"backend": kind, "data": {"jti": jti, "n": 1.5, "list": [1, "x"]}}})
            };
            let mut ids = Vec::new();
            for (i, (file, claims)) in claim_fixtures().into_iter().enumerate().take(6) {
                let id = format!("lse_01K3ZQ4V5W6X7Y8Z9A0B1C2D{i:02}");
                let job = format!("{}:{i}:1", file.split('-').next().unwrap_or("github"));
                let mut lease = json!({
                    "id": id, "job": job, "policy": "deploy", "issuer": "github", "created_at": NOW,
                    "expires_at": NOW + if i == 2 { 5 } else { 3600 }, "state": "active",
                    "credentials": [credential("jwt", &format!("jti-{i}"))], "claims": claims,
                });
                if i == 1 {
                    lease["renewal"] = json!({"token_sha256": "ab".repeat(32), "count": 0, "last_at": 0});
                }
                let lease: Lease = serde_json::from_value(lease).unwrap();
                let replay = ephemera::identity::ReplayKey::new(format!("{:064x}", i + 1), NOW + 300);
                store.issue(lease, Some(&replay)).await.unwrap();
                ids.push(id);
            }
            let renewed: LeaseCredential = serde_json::from_value(credential("jwt", "jti-renewed")).unwrap();
            store.renew(&ids[1], &[renewed], NOW + 60).await.unwrap();
            store.begin_revoke(&ids[0], "job", NOW + 70).await.unwrap();
            store.finish_revoke(&ids[0], None, NOW + 71).await.unwrap();
            store.begin_revoke(&ids[3], "webhook", NOW + 80).await.unwrap();
            store.finish_revoke(&ids[3], Some("AccessDenied: not authorized".into()), NOW + 81).await.unwrap();
            store.flush().await.unwrap();
            let appended = std::fs::read(dir.path().join("journal")).unwrap();
            store.maintain(NOW + 4000).await.unwrap();
            store.flush().await.unwrap();
            let compacted = std::fs::read(dir.path().join("journal")).unwrap();
            vec![appended, compacted]
        })
    }
}

fn event_kind(e: &Event) -> &'static str {
    match e {
        Event::Created { lease } if lease.renewal.is_some() => "created+renewal",
        Event::Created { .. } => "created",
        Event::RevokeRequested { .. } => "revoke_requested",
        Event::Revoked { .. } => "revoked",
        Event::Expired { .. } => "expired",
        Event::RevokeFailed { .. } => "revoke_failed",
        Event::Irrevocable { .. } => "irrevocable",
        Event::Renewed { .. } => "renewed",
        Event::JtiUsed { .. } => "jti_used",
    }
}

impl Target for Journal {
    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Journal::written_by_the_file_store();
        // The first journal format: `Created` as JSON.
        if let Ok((events, _)) = decode(&seeds[0]) {
            let mut json_form = MAGIC.to_vec();
            for event in &events {
                let payload = serde_json::to_vec(event).unwrap();
                let len = (payload.len() as u32).to_le_bytes();
                let mut crc = crc32fast::Hasher::new();
                crc.update(&len);
                crc.update(&payload);
                json_form.extend_from_slice(&len);
                json_form.extend_from_slice(&crc.finalize().to_le_bytes());
                json_form.extend_from_slice(&payload);
            }
            seeds.push(json_form);
        }
        seeds.push(MAGIC.to_vec());
        seeds.push(MAGIC[..3].to_vec());
        seeds
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let decoded = decode(input);
        let mut streamed = 0usize;
        let good = decode_with(input, |_| streamed += 1);
        match (&decoded, &good) {
            (Ok((events, a)), Ok(b)) if a == b && events.len() == streamed => {}
            (Err(a), Err(b)) if a == b => {}
            _ => {
                return Err(format!(
                    "decode and decode_with disagree: {:?} vs {good:?}",
                    decoded.as_ref().map(|d| d.1)
                ));
            }
        }
        let (events, good) = match decoded {
            Ok(d) => d,
            // The first line: a record may quote a caller's text, newlines and all.
            Err(e) => return Ok(format!("err {}", shape(e.lines().next().unwrap_or_default()))),
        };
        if good as usize > input.len() {
            return Err(format!("a good prefix of {good} bytes in a file of {}", input.len()));
        }
        // What replay read must survive being written again: appends write self-contained
        // records, and compaction rewrites every lease in the dictionary form. A record whose
        // meaning changed on the way would change a lease after the next restart.
        for (form, encoded) in [("encode", Encoder::Appends), ("SnapshotEncoder", Encoder::Compaction)]
            .map(|(name, which)| (name, which.encode(&events)))
        {
            match decode(&encoded) {
                Ok((again, len)) if same_events(&again, &events) && len as usize == encoded.len() => {}
                Ok((again, _)) => {
                    let differs = events.iter().zip(&again).position(|(a, b)| a != b).unwrap_or(events.len());
                    return Err(format!(
                        "{form}: {} events read back as {} (first difference: event {differs}, {:?})",
                        events.len(),
                        again.len(),
                        events.get(differs).map(event_kind)
                    ));
                }
                Err(e) => return Err(format!("{form}: what decoded does not decode once encoded again: {e}")),
            }
        }
        let kinds: BTreeSet<&str> = events.iter().map(event_kind).collect();
        let torn = if (good as usize) < input.len() { " torn" } else { "" };
        Ok(format!("ok {kinds:?}{torn}"))
    }
}

/// Equal events; or equal once every float is rounded to 15 significant digits. A revoke
/// handle's data is JSON text that a JSON record (`Renewed`) parses and writes again, and
/// serde_json (without `float_roundtrip`) may read a float a last bit off: a handle holding
/// `1.8446744073709552e20` can come back one ULP away. No backend's handle holds a float.
fn same_events(a: &[Event], b: &[Event]) -> bool {
    fn rounded(v: Value) -> Value {
        match v {
            Value::Number(n) if n.is_f64() => Value::String(format!("{:.14e}", n.as_f64().unwrap_or_default())),
            Value::Array(items) => Value::Array(items.into_iter().map(rounded).collect()),
            Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, rounded(v))).collect()),
            other => other,
        }
    }
    a == b || {
        let as_value = |e: &[Event]| serde_json::to_value(e).map(rounded).ok();
        as_value(a).is_some_and(|x| Some(x) == as_value(b))
    }
}

#[derive(Clone, Copy)]
enum Encoder {
    Appends,
    Compaction,
}

impl Encoder {
    fn encode(self, events: &[Event]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        match self {
            Encoder::Appends => encode(events, &mut out),
            Encoder::Compaction => SnapshotEncoder::default().encode(events, &mut out),
        }
        out
    }
}
