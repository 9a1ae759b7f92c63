//! ephemera: a CI/CD credential broker.
//!
//! A pipeline job presents its platform's OIDC ID token; ephemera verifies it ([`identity`]),
//! decides by a named policy ([`policy`]), mints job-scoped credentials ([`mint`]), records them as
//! one lease ([`ledger`]) and revokes them when the job ends. [`http`] is the wire; [`app`] ties
//! the rooms together. Dependencies point one way: `http` → `app` → {identity, policy, mint, ledger}.

pub mod app;
pub mod audit;
pub mod aws_format;
pub mod claims;
pub mod client;
pub mod clock;
pub mod config;
pub mod dev;
pub mod env_format;
pub mod error;
pub mod github_format;
pub mod hook_format;
pub mod http;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod limits;
pub mod log_format;
pub mod metrics;
pub mod mint;
pub mod names;
pub mod pg_connect;
pub mod pg_names;
pub mod policy;
pub mod secret;
pub mod server;
pub mod ssh_format;

pub use identity::provider::install_crypto;
