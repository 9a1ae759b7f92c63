//! The records of a lease's life, as a store writes them: the journal's records, and what a
//! replay applies.

use super::{Lease, LeaseCredential};
use crate::clock::UnixSeconds;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One journal record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    Created {
        /// Shared with memory, which keeps the same allocation (a replay of a million records
        /// neither copies nor frees one per lease).
        lease: Arc<Lease>,
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
    /// A renewal's credentials joined the lease (issue 15). Replayed whatever the lease's state
    /// (a revocation may have started after the renewal was recorded): what was minted must be
    /// revoked with it. A credential whose revoke handle the lease lists already is not listed
    /// twice (revoking it once revokes both: e.g. two AWS sessions of the lease ending in the
    /// same second have one handle, the lease's SourceIdentity on one role).
    Renewed {
        id: String,
        at: UnixSeconds,
        /// The lease's renewal count after this one, so applying the record twice (a compaction
        /// carries records over) counts it once.
        count: u32,
        credentials: Vec<LeaseCredential>,
    },
    /// A token's `jti` was used for an exchange under a policy (replay protection).
    JtiUsed {
        key: String,
        exp: UnixSeconds,
    },
}
