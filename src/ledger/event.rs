//! The records of a lease's life, as a store writes them: the journal's records, and what a
//! replay applies.

use super::Lease;
use crate::clock::UnixSeconds;
use serde::{Deserialize, Serialize};

/// One journal record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    Created {
        lease: Box<Lease>,
    },
    RevokeRequested {
        id: String,
        reason: String,
        at: UnixSeconds,
    },
    Revoked {
        id: String,
        at: UnixSeconds,
    },
    Expired {
        id: String,
        at: UnixSeconds,
    },
    RevokeFailed {
        id: String,
        at: UnixSeconds,
        attempts: u32,
        next_at: UnixSeconds,
        error: String,
    },
    Irrevocable {
        id: String,
        at: UnixSeconds,
        attempts: u32,
        next_at: UnixSeconds,
        error: String,
    },
    /// A token's `jti` was used for an exchange under a policy (replay protection).
    JtiUsed {
        key: String,
        exp: UnixSeconds,
    },
}
