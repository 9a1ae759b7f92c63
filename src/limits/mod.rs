//! limits: abuse limits (`[limits]`, docs/architecture.md "Limits and bounds").
//!
//! Before any work is done for a request that would issue or renew a credential:
//!
//! - its **client address** must be outside a cool-off and within its token bucket;
//!
//! and once its token is verified (from verified claims only: an unverified claim could name
//! anyone's repository and spend its budget):
//!
//! - its **repository** (the issuer's identity claims: ids, never names) and its **issuer** must
//!   be within theirs.
//!
//! A request that fails (an invalid token, a denial) is charged to its address's failure
//! budget; a spent budget starts a cool-off in which that address is refused before any
//! signature is checked, so a flood of bad tokens costs a table lookup per request. Revocation is
//! never limited: a job holding a lease can always end it.
//!
//! Every table is bounded (`max_tracked` keys): past it, newcomers share one bucket until the
//! next sweep forgets idle keys. The decisions are pure functions of `now` (microseconds).

mod address;
mod bucket;

pub use address::{Network, client_address, limit_key};
pub use bucket::{Bucket, Rate};

use crate::claims::scalar_text;
use crate::config::{IssuerConfig, LimitsConfig};
use crate::error::Error;
use crate::identity::VerifiedIdentity;
use dashmap::DashMap;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

const MICROS: i64 = 1_000_000;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Address,
    CoolOff,
    Issuer,
    Repository,
}

impl Limit {
    pub const ALL: [Limit; 4] = [Limit::Address, Limit::CoolOff, Limit::Issuer, Limit::Repository];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Address => "address",
            Limit::CoolOff => "cool-off",
            Limit::Issuer => "issuer",
            Limit::Repository => "repository",
        }
    }
}

/// A request refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    /// The address, issuer or repository key (no secret: ids and addresses).
    pub key: String,
    pub retry_after_secs: i64,
    /// `Some(n)` for the first refusal of this key in an audit window: audit it, with the `n`
    /// refusals since the last audited one (this one included). `None`: counted, not audited.
    pub audit: Option<u64>,
}

impl Refusal {
    pub fn error(&self) -> Error {
        Error::RateLimited { limit: self.limit.as_str(), retry_after_secs: self.retry_after_secs }
    }
}

/// One key's state: its bucket, its failure budget and cool-off (addresses), and when it was
/// last audited.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    tat: i64,
    failure_tat: i64,
    cool_until: i64,
    refused: u64,
    audited_at: Option<i64>,
}

impl Entry {
    /// Nothing here limits anyone any more: the same as a key never seen.
    fn idle(&self, now: i64) -> bool {
        bucket::is_idle(self.tat, now) && bucket::is_idle(self.failure_tat, now) && self.cool_until <= now
    }
}

/// Keys to entries, at most `cap` of them.
struct Table<K> {
    entries: DashMap<K, Entry>,
    /// Where keys past the cap go, together.
    overflow: Mutex<Entry>,
    cap: usize,
    last_sweep: AtomicI64,
}

impl<K: Eq + Hash> Table<K> {
    fn new(cap: usize) -> Table<K> {
        Table { entries: DashMap::new(), overflow: Mutex::new(Entry::default()), cap, last_sweep: AtomicI64::new(0) }
    }

    fn with<Q, R>(&self, key: &Q, now: i64, f: impl FnOnce(&mut Entry) -> R) -> R
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(mut entry) = self.entries.get_mut(key) {
            return f(&mut entry);
        }
        if self.entries.len() >= self.cap {
            self.sweep(now);
        }
        if self.entries.len() >= self.cap {
            // Memory exhaustion: a flood from more sources than the table holds. The newcomers
            // share one bucket (they limit each other) until a sweep finds idle keys to forget.
            return f(&mut self.overflow.lock().unwrap_or_else(PoisonError::into_inner));
        }
        f(&mut self.entries.entry(key.to_owned()).or_default())
    }

    /// Forgets idle keys, at most once a second (a full table under a flood must not turn each
    /// request into a walk of the table).
    fn sweep(&self, now: i64) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last < MICROS
            || self.last_sweep.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        self.entries.retain(|_, e| !e.idle(now));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

pub struct Limits {
    address: Option<Rate>,
    issuer: Option<Rate>,
    repository: Option<Rate>,
    failures: Option<Rate>,
    cool_off: i64,
    audit_window: i64,
    trusted_proxies: Vec<Network>,
    /// Issuer name → the claims that name a repository (its identity claims).
    repository_claims: HashMap<String, Vec<String>>,
    addresses: Table<IpAddr>,
    issuers: Table<String>,
    repositories: Table<String>,
    refused: [AtomicU64; 4],
    /// Requests issuing or renewing credentials at once (`max_issuing`).
    issuing: tokio::sync::Semaphore,
    max_issuing: usize,
    issuing_wait: Duration,
    body_read_timeout: Duration,
    overloaded: AtomicU64,
}

impl Limits {
    pub fn new(config: &LimitsConfig, issuers: &[IssuerConfig]) -> Limits {
        let cap = config.max_tracked;
        let repository_claims = issuers
            .iter()
            .map(|i| {
                let claims = if i.platform.configured_claims() {
                    i.identity_claims.clone()
                } else {
                    i.platform.identity_claims().iter().map(|c| (*c).to_string()).collect()
                };
                (i.name.clone(), claims)
            })
            .collect();
        Limits {
            address: config.address,
            issuer: config.issuer,
            repository: config.repository,
            failures: config.failures,
            cool_off: config.cool_off_secs.saturating_mul(MICROS),
            audit_window: config.audit_window_secs.saturating_mul(MICROS),
            trusted_proxies: config.trusted_proxies.clone(),
            repository_claims,
            addresses: Table::new(cap),
            issuers: Table::new(cap),
            repositories: Table::new(cap),
            refused: Default::default(),
            issuing: tokio::sync::Semaphore::new(config.max_issuing),
            max_issuing: config.max_issuing,
            issuing_wait: Duration::from_millis(config.issuing_wait_ms),
            body_read_timeout: Duration::from_secs(config.body_read_timeout_secs),
            overloaded: AtomicU64::new(0),
        }
    }

    /// A slot among the `max_issuing` requests that may issue or renew credentials at once,
    /// waiting up to `issuing_wait` for one. Holding the slot is holding the bound: drop it when
    /// the request is done. Revocations never take one.
    pub async fn issuing_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        if let Ok(slot) = self.issuing.try_acquire() {
            return Ok(slot);
        }
        match tokio::time::timeout(self.issuing_wait, self.issuing.acquire()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => {
                self.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(Error::Overloaded("requests issuing credentials at once"))
            }
        }
    }

    /// How long a request's body may take to arrive.
    pub fn body_read_timeout(&self) -> Duration {
        self.body_read_timeout
    }

    /// Requests issuing or renewing credentials now (`/metrics`).
    pub fn issuing_in_flight(&self) -> usize {
        self.max_issuing.saturating_sub(self.issuing.available_permits())
    }

    /// Requests refused by the `max_issuing` bound so far (`/metrics`).
    pub fn overloaded(&self) -> u64 {
        self.overloaded.load(Ordering::Relaxed)
    }

    /// The client of a request from `peer` with these `X-Forwarded-For` values.
    pub fn client<'a>(&self, peer: IpAddr, forwarded_for: impl DoubleEndedIterator<Item = &'a str>) -> IpAddr {
        client_address(peer, forwarded_for, &self.trusted_proxies)
    }

    /// Before any work for a request from `client` (`None`: not over the network): outside a
    /// cool-off, and within the address's bucket.
    pub fn admit_client(&self, client: Option<IpAddr>, now: i64) -> Result<(), Refusal> {
        let Some(ip) = client else { return Ok(()) };
        let key = limit_key(ip);
        let refusal = self.addresses.with(&key, now, |e| {
            // Credential stuffing / signature floods: a source that keeps failing is refused
            // before its next token costs a signature check.
            if e.cool_until > now {
                // A clock that stepped back does not lengthen a cool-off.
                e.cool_until = e.cool_until.min(now.saturating_add(self.cool_off));
                return Some((Limit::CoolOff, e.cool_until - now, self.audit_due(e, now)));
            }
            let rate = self.address?;
            let wait = rate.admit(&mut e.tat, now).err()?;
            Some((Limit::Address, wait, self.audit_due(e, now)))
        });
        self.refusal(refusal, || key.to_string())
    }

    /// A request from `client` failed in a way an attacker's would (an invalid token, a denial,
    /// a malformed request): charged to the address's failure budget. A spent budget starts the
    /// cool-off.
    pub fn failed(&self, client: Option<IpAddr>, now: i64) {
        let (Some(ip), Some(rate)) = (client, self.failures) else { return };
        self.addresses.with(&limit_key(ip), now, |e| {
            if rate.admit(&mut e.failure_tat, now).is_err() && e.cool_until <= now {
                e.cool_until = now.saturating_add(self.cool_off);
            }
        });
    }

    /// After verification: within the repository's bucket, then the issuer's. The repository
    /// goes first, so one noisy repository is refused by its own bucket without spending its
    /// issuer's.
    pub fn admit_identity(&self, identity: &VerifiedIdentity, now: i64) -> Result<(), Refusal> {
        if let Some(rate) = self.repository {
            let key = self.repository_key(identity);
            let refusal = self.repositories.with(key.as_str(), now, |e| {
                let wait = rate.admit(&mut e.tat, now).err()?;
                Some((Limit::Repository, wait, self.audit_due(e, now)))
            });
            self.refusal(refusal, || key.clone())?;
        }
        if let Some(rate) = self.issuer {
            let key = identity.issuer();
            let refusal = self.issuers.with(key, now, |e| {
                let wait = rate.admit(&mut e.tat, now).err()?;
                Some((Limit::Issuer, wait, self.audit_due(e, now)))
            });
            self.refusal(refusal, || key.to_string())?;
        }
        Ok(())
    }

    /// `issuer:value:value`: the issuer and the values of its identity claims (ids that are
    /// never reused, so a renamed repository keeps its bucket); `sub` where it has none.
    fn repository_key(&self, identity: &VerifiedIdentity) -> String {
        let claims = identity.claims();
        let mut key = identity.issuer().to_string();
        let names = self.repository_claims.get(identity.issuer()).filter(|c| !c.is_empty());
        let names: &[String] = names.map_or(&[], Vec::as_slice);
        if names.is_empty() {
            key.push(':');
            key.push_str(identity.subject());
        }
        for name in names {
            key.push(':');
            key.push_str(&claims.get(name).and_then(scalar_text).unwrap_or_default());
        }
        key
    }

    /// Counts a refusal; is it the first of its key in this audit window?
    fn audit_due(&self, e: &mut Entry, now: i64) -> Option<u64> {
        e.refused += 1;
        if e.audited_at.is_some_and(|at| now - at < self.audit_window) {
            return None;
        }
        e.audited_at = Some(now);
        Some(std::mem::take(&mut e.refused))
    }

    fn refusal(&self, refused: Option<(Limit, i64, Option<u64>)>, key: impl FnOnce() -> String) -> Result<(), Refusal> {
        let Some((limit, wait, audit)) = refused else { return Ok(()) };
        self.refused[limit as usize].fetch_add(1, Ordering::Relaxed);
        // Whole seconds, rounded up: a client that waits what it is told gets in.
        let retry_after_secs = ((wait + MICROS - 1) / MICROS).max(1);
        Err(Refusal { limit, key: key(), retry_after_secs, audit })
    }

    /// Requests refused so far, by limit (`/metrics`).
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        Limit::ALL.iter().map(|l| (l.as_str(), self.refused[*l as usize].load(Ordering::Relaxed))).collect()
    }

    /// Keys tracked now, across the tables (`/metrics`: the tables' memory is bounded by
    /// `max_tracked` each).
    pub fn tracked(&self) -> usize {
        self.addresses.len() + self.issuers.len() + self.repositories.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;

    const SECOND: i64 = MICROS;

    fn limits(edit: impl FnOnce(&mut LimitsConfig)) -> Limits {
        let mut config = LimitsConfig::off();
        edit(&mut config);
        Limits::new(&config, &[])
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([198, 51, 100, last]))
    }

    #[test]
    fn an_address_past_its_bucket_is_refused_with_the_wait_and_audited_once_per_window() {
        let l = limits(|c| {
            c.address = Some(Rate { per_second: 1.0, burst: 2 });
            c.audit_window_secs = 60;
        });
        let now = 1_000 * SECOND;
        assert!(l.admit_client(ip(1), now).is_ok());
        assert!(l.admit_client(ip(1), now).is_ok());
        let first = l.admit_client(ip(1), now).unwrap_err();
        assert_eq!((first.limit, first.retry_after_secs, first.audit), (Limit::Address, 1, Some(1)));
        assert_eq!(first.key, "198.51.100.1");
        assert_eq!(first.error().status(), 429);
        // Within the window: refused, counted, not audited again.
        for _ in 0..9 {
            assert_eq!(l.admit_client(ip(1), now + SECOND / 10).unwrap_err().audit, None);
        }
        // Another address has its own bucket.
        assert!(l.admit_client(ip(2), now).is_ok());
        // The next window's first refusal carries the count of the ones not audited.
        let mut later = now + 61 * SECOND;
        let refusal = loop {
            match l.admit_client(ip(1), later) {
                Ok(()) => later += 1,
                Err(r) => break r,
            }
        };
        assert_eq!(refusal.audit, Some(10));
        assert_eq!(l.admit_client(ip(1), later).unwrap_err().audit, None);
        assert_eq!(l.refused().iter().find(|(n, _)| *n == "address").map(|x| x.1), Some(12));
    }

    #[test]
    fn repeated_failures_start_a_cool_off_that_refuses_before_any_work_then_ends() {
        let l = limits(|c| {
            c.failures = Some(Rate { per_second: 0.1, burst: 3 });
            c.cool_off_secs = 30;
        });
        let now = 5_000 * SECOND;
        for _ in 0..3 {
            l.failed(ip(7), now);
            assert!(l.admit_client(ip(7), now).is_ok(), "within the failure budget");
        }
        l.failed(ip(7), now);
        let refused = l.admit_client(ip(7), now + SECOND).unwrap_err();
        assert_eq!((refused.limit, refused.retry_after_secs), (Limit::CoolOff, 29));
        // Failing during the cool-off does not extend it.
        l.failed(ip(7), now + 10 * SECOND);
        assert!(l.admit_client(ip(7), now + 29 * SECOND).is_err());
        assert!(l.admit_client(ip(7), now + 30 * SECOND).is_ok());
        // Nobody else is cooled off, and `None` (not from the network) is never limited.
        assert!(l.admit_client(ip(8), now + SECOND).is_ok());
        assert!(l.admit_client(None, now).is_ok());
    }

    #[test]
    fn a_flood_from_more_addresses_than_the_table_holds_shares_one_bucket() {
        let l = limits(|c| {
            c.address = Some(Rate { per_second: 1.0, burst: 1 });
            c.max_tracked = 10;
        });
        let now = 9_000 * SECOND;
        for last in 0..10 {
            assert!(l.admit_client(ip(last), now).is_ok());
        }
        assert_eq!(l.tracked(), 10);
        // Past the cap, newcomers go to the overflow bucket together.
        assert!(l.admit_client(ip(100), now).is_ok());
        assert!(l.admit_client(ip(101), now).is_err(), "the overflow bucket is shared");
        assert_eq!(l.tracked(), 10, "memory stays bounded");
        // Once the tracked keys are idle, a sweep forgets them and newcomers get their own.
        assert!(l.admit_client(ip(102), now + 5 * SECOND).is_ok());
        assert_eq!(l.tracked(), 1);
    }
}
