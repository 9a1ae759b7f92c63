//! ledger: every lease ephemera ever issued, until its credentials are certainly dead.
//!
//! The rest of the broker sees leases only through [`LeaseStore`] ([`store`]): issue a lease
//! with its token's replay key in one step, hand each revocation and each due expiry or retry to
//! one caller, record outcomes, read, and maintain. [`FileStore`] is the embedded store and the
//! default: leases in memory ([`memory`]), every change in the [`journal`] under the data
//! directory, replayed at start. [`PgStore`] ([`postgres`]) keeps them in a PostgreSQL database that
//! several replicas share.
//!
//! [`lease`] holds the plain data every store keeps: [`Lease`], its states and credentials, the
//! claims it was granted on ([`ClaimSnapshot`]), and [`Event`], the records of its life.

mod codec;
mod event;
mod file_store;
pub mod journal;
mod lease;
mod memory;
mod postgres;
mod sharded;
pub mod snapshot;
mod store;
pub mod strings;
#[cfg(test)]
mod suite;

pub use event::Event;
pub use file_store::{FileStore, FileStoreOptions, StorageWrap};
pub use lease::{
    ENDED_RETENTION_SECS, Lease, LeaseCredential, LeaseFilter, LeaseState, MAX_RENEWALS, REASON_EXPIRED, Renewal,
    RetryPolicy, RevokeWork, STALLED_ATTEMPT_SECS, name,
};
pub use postgres::{DELIVERY_RETENTION_SECS, PgStore, SCHEMA_VERSION};
pub use snapshot::ClaimSnapshot;
pub use store::{
    CompactionStats, Counts, Due, Health, IssueError, LeaseStore, LiveLease, Maintained, NO_QUIET_BACKENDS, StoreError,
};
