//! ephemera: a CI/CD credential broker.
//!
//! A pipeline job presents its platform's OIDC ID token; ephemera verifies it ([`identity`]),
//! decides by a named policy ([`policy`]), mints job-scoped credentials ([`mint`]), records them as
//! one lease ([`ledger`]) and revokes them when the job ends. [`http`] is the wire; [`app`] ties
//! the rooms together. Dependencies point one way: `http` → `app` → {identity, policy, mint, ledger}.

pub mod app;
pub mod audit;
pub mod aws_format;
pub mod client;
pub mod clock;
pub mod config;
pub mod dev;
pub mod env_format;
pub mod error;
pub mod http;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod metrics;
pub mod mint;
pub mod policy;
pub mod secret;
pub mod server;

/// Installs the process-wide crypto providers exactly once: ring for rustls (the JWKS client) and
/// ring for jsonwebtoken. Without this, both crates compile and then panic at first use.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Both calls fail only if a provider is already installed, which is what we want anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = identity::provider::RING_PROVIDER.install_default();
    });
}
