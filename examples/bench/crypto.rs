//! Row 1, the crypto floor: what one exchange cannot avoid, per core. RS256 verification of a
//! GitHub-shaped token (~1 KB of claims) through jsonwebtoken with the broker's ring provider,
//! exactly as `Verifier::verify` calls it, plus one ES256 signature of a broker JWT by the
//! broker's own `JwtSigner` (key parsed once). Measured as this thread's CPU time, so time the
//! machine gives to other tenants does not count, just as it does not count in the broker's
//! CPU time it is compared with.

use crate::procfs::thread_cpu_seconds;
use crate::tokens::{Issuer, decoding_key};
use ephemera::mint::jwt::JwtSigner;
use jsonwebtoken::Algorithm;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Map, Value, json};
use std::hint::black_box;

#[derive(Clone, Copy, Debug)]
pub struct Floor {
    /// µs of CPU per RS256 verification.
    pub verify_us: f64,
    /// µs of CPU per ES256 broker-JWT signature.
    pub sign_us: f64,
    pub token_bytes: usize,
    pub samples: usize,
    /// The lowest and highest (verify + sign) of a single sample, µs.
    pub spread: (f64, f64),
}

impl Floor {
    pub fn total_us(&self) -> f64 {
        self.verify_us + self.sign_us
    }
}

/// Measures the floor in samples spread over the run (before, between and after the exchange
/// phases), so the baseline sees the same machine the broker saw. The floor is the sum over all
/// samples: operations ÷ CPU time.
pub struct Sampler {
    message: String,
    signature: String,
    key: jsonwebtoken::DecodingKey,
    signer: JwtSigner,
    claims: Map<String, Value>,
    token_bytes: usize,
    verify: (usize, f64),
    sign: (usize, f64),
    totals: Vec<f64>,
}

impl Sampler {
    pub fn new() -> Sampler {
        ephemera::install_crypto();
        let issuer = Issuer::new("https://token.actions.githubusercontent.com", "https://ephemera.bench.invalid");
        let token = issuer.token(0, 1_800_000_000);
        let (message, signature) = token.rsplit_once('.').unwrap();
        let sampler = Sampler {
            message: message.to_string(),
            signature: signature.to_string(),
            key: decoding_key(),
            signer: broker_signer(),
            claims: broker_jwt_claims(),
            token_bytes: token.len(),
            verify: (0, 0.0),
            sign: (0, 0.0),
            totals: Vec::new(),
        };
        assert!(sampler.verify_once(), "the floor's token does not verify");
        sampler
    }

    fn verify_once(&self) -> bool {
        jsonwebtoken::crypto::verify(&self.signature, self.message.as_bytes(), &self.key, Algorithm::RS256).unwrap()
    }

    /// One sample: `cpu_secs` of this thread's CPU, half verifying, half signing.
    pub fn sample(&mut self, cpu_secs: f64) {
        let (v, v_cpu) = timed(cpu_secs / 2.0, || black_box(self.verify_once()));
        let (s, s_cpu) = timed(cpu_secs / 2.0, || black_box(self.signer.sign(&self.claims).unwrap()));
        self.verify = (self.verify.0 + v, self.verify.1 + v_cpu);
        self.sign = (self.sign.0 + s, self.sign.1 + s_cpu);
        self.totals.push((v_cpu / v as f64 + s_cpu / s as f64) * 1e6);
    }

    pub fn floor(&self) -> Floor {
        let lowest = self.totals.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = self.totals.iter().copied().fold(0.0, f64::max);
        Floor {
            verify_us: self.verify.1 / self.verify.0 as f64 * 1e6,
            sign_us: self.sign.1 / self.sign.0 as f64 * 1e6,
            token_bytes: self.token_bytes,
            samples: self.totals.len(),
            spread: (lowest, highest),
        }
    }
}

/// Runs `op` in batches until `secs` of this thread's CPU time have passed: (ops, CPU seconds).
fn timed<T>(secs: f64, mut op: impl FnMut() -> T) -> (usize, f64) {
    let start = thread_cpu_seconds();
    let mut n = 0;
    loop {
        for _ in 0..64 {
            black_box(op());
        }
        n += 64;
        let used = thread_cpu_seconds() - start;
        if used >= secs {
            return (n, used);
        }
    }
}

/// A broker signing key like the one `serve` generates into its data directory.
pub fn broker_signer() -> JwtSigner {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
    JwtSigner::from_pkcs8(pkcs8.as_ref(), "https://ephemera.bench.invalid").unwrap()
}

/// The claims `JwtBackend` signs for the bench policy's grant (about 400 bytes).
pub fn broker_jwt_claims() -> Map<String, Value> {
    let value = json!({
        "scope": "deploy:web", "repository": "octo-org/octo-repo", "environment": "prod",
        "iss": "https://ephemera.bench.invalid", "sub": "github:74:7712340001:2:96193868770",
        "aud": "https://deploy-api.internal.example", "exp": 1_800_000_900, "nbf": 1_800_000_000,
        "iat": 1_800_000_000, "jti": "jti_0123456789abcdefghijkl", "lease_id": "lse_01KBENCH0000000000000000000",
        "policy": "bench",
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}
