//! The leases by id, and the used `jti`s by key: maps in shards that a compaction takes one at
//! a time.
//!
//! Why not a `DashMap`: a compaction needs a reference to every lease and every guarded `jti`,
//! and must not hold a lock that an exchange may want while it encodes them, because its thread
//! runs at a lower priority (a thread set aside with such a lock held stops every exchange that
//! wants it). Taking all million references in one pass took a core for ~80 ms at the start of
//! every compaction, outside the compaction's pacing: a scheduler trace of row 11a's 1M windows
//! showed the compaction's thread on one core for 48 ms at a stretch while the exchanges
//! crowded onto the other, and the window's slow exchanges in that first tenth of a second
//! (docs/benchmarks.md). A `DashMap`'s shards can be reached only through its `raw-api`, whose
//! tables take `unsafe` to walk, and this crate forbids `unsafe`. Here a compaction takes one
//! shard's entries at a time ([`Sharded::shard`]: about a thousand reference counts, under
//! that shard's read lock only), so the pass is spread over the compaction's paced pieces, as
//! the encoding is. The used `jti`s went the same way one step later: a broker keeps one per
//! exchange of a token still valid, which at a high rate and with tokens that live ten minutes
//! is as many as its leases.

use super::Lease;
use crate::clock::UnixSeconds;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use parking_lot::{MappedRwLockReadGuard, MappedRwLockWriteGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

/// How many shards. A shard grows by doubling under its write lock, rehashing its entries
/// while inserts into it wait: with 8 (dashmap's default on two cores), the first inserts after
/// replaying a million leases stopped exchanges for hundreds of milliseconds (row 11a). With
/// 1,024 a growth moves a thousandth of the leases, and what an insert can wait behind while a
/// compaction takes a shard's references is a thousandth of them.
pub(super) const SHARDS: usize = 1024;

/// An entry that carries its own key: a lease its id, a used `jti` its key. The map stores the
/// entry alone, so a slot is as small as the entry.
pub(super) trait Keyed: Clone {
    fn key(&self) -> &str;
}

impl Keyed for Arc<Lease> {
    fn key(&self) -> &str {
        &self.id
    }
}

/// A used `jti`'s replay key, guarded until the token's expiry.
#[derive(Clone)]
pub(super) struct UsedJti {
    pub(super) key: Arc<str>,
    pub(super) exp: UnixSeconds,
}

impl Keyed for UsedJti {
    fn key(&self) -> &str {
        &self.key
    }
}

pub(super) type LeaseMap = Sharded<Arc<Lease>>;
pub(super) type JtiMap = Sharded<UsedJti>;

/// A shard: the entries, found by their key's hash, computed once per call for both the shard
/// and the slot in it (as a `DashMap` does; a `HashMap` a shard would hash the key again).
type Shard<V> = HashTable<V>;

pub(super) struct Sharded<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    /// Picks an entry's shard. Keyed per process: the lease ids are the broker's own, but the
    /// key of a lookup comes from a caller (a `jti` from a token), and a known hash would let
    /// one aim at a single shard.
    pick: RandomState,
}

impl<V: Keyed> Default for Sharded<V> {
    fn default() -> Sharded<V> {
        Sharded::with_capacity(0)
    }
}

impl<V: Keyed> Sharded<V> {
    /// Room for `entries` without growing (a replay of that many records).
    pub(super) fn with_capacity(entries: usize) -> Sharded<V> {
        let each = entries.div_ceil(SHARDS);
        Sharded {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::with_capacity(each))).collect(),
            pick: RandomState::new(),
        }
    }

    fn hash(&self, key: &str) -> u64 {
        self.pick.hash_one(key)
    }

    /// The shard of an id's hash. Bits 40 and up: a shard's table takes a slot from the low
    /// bits and a tag from the top seven, and within one shard these bits are all the same.
    fn shard_of(&self, hash: u64) -> &RwLock<Shard<V>> {
        &self.shards[(hash >> 40) as usize & (SHARDS - 1)]
    }

    fn rehash(&self) -> impl Fn(&V) -> u64 + '_ {
        |entry| self.hash(entry.key())
    }

    pub(super) fn get(&self, key: &str) -> Option<MappedRwLockReadGuard<'_, V>> {
        let hash = self.hash(key);
        RwLockReadGuard::try_map(self.shard_of(hash).read(), |shard| shard.find(hash, |e| e.key() == key)).ok()
    }

    /// The entry, its shard write-locked while the guard lives.
    pub(super) fn get_mut(&self, key: &str) -> Option<MappedRwLockWriteGuard<'_, V>> {
        let hash = self.hash(key);
        RwLockWriteGuard::try_map(self.shard_of(hash).write(), |shard| shard.find_mut(hash, |e| e.key() == key)).ok()
    }

    /// Inserts `entry`, or replaces the one with its key.
    pub(super) fn insert(&self, entry: V) {
        let hash = self.hash(entry.key());
        match self.shard_of(hash).write().entry(hash, |e| e.key() == entry.key(), self.rehash()) {
            Entry::Occupied(mut slot) => *slot.get_mut() = entry,
            Entry::Vacant(slot) => {
                slot.insert(entry);
            }
        }
    }

    /// Inserts `entry` unless its key is known, calling `first` just before, under the shard's
    /// lock (so no one sees the entry before its indexes). False: known, nothing done.
    pub(super) fn insert_new(&self, entry: V, first: impl FnOnce(&V)) -> bool {
        let hash = self.hash(entry.key());
        match self.shard_of(hash).write().entry(hash, |e| e.key() == entry.key(), self.rehash()) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                first(&entry);
                slot.insert(entry);
                true
            }
        }
    }

    /// Removes the entry of `key` if `done` says so of it, and returns it.
    pub(super) fn remove_if(&self, key: &str, done: impl FnOnce(&V) -> bool) -> Option<V> {
        let hash = self.hash(key);
        let mut shard = self.shard_of(hash).write();
        let found = shard.find_entry(hash, |e| e.key() == key).ok()?;
        if done(found.get()) { Some(found.remove().0) } else { None }
    }

    /// Calls `f` with every entry, one shard at a time, each under its read lock (admin
    /// queries and tests: `f` must not look up an entry).
    pub(super) fn for_each(&self, mut f: impl FnMut(&V)) {
        for shard in self.shards.iter() {
            shard.read().iter().for_each(&mut f);
        }
    }

    /// What `f` makes of each entry, where it makes something, one shard at a time under its
    /// read lock (as [`Sharded::for_each`]).
    pub(super) fn filter_map<T>(&self, mut f: impl FnMut(&V) -> Option<T>) -> Vec<T> {
        let mut out = Vec::new();
        self.for_each(|entry| out.extend(f(entry)));
        out
    }

    /// A copy of every entry of shard `i` (of [`SHARDS`]; none past the last), taken under its
    /// read lock and returned with no lock held: for a lease a reference count, for a `jti` a
    /// reference count and its expiry.
    pub(super) fn shard(&self, i: usize) -> Vec<V> {
        self.shards.get(i).map(|shard| shard.read().iter().cloned().collect()).unwrap_or_default()
    }

    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Event;

    fn lease(i: usize) -> Arc<Lease> {
        let lease = serde_json::json!({
            "id": format!("lse_{i}"), "job": format!("github:74:{i}:1:{i}"), "policy": "deploy", "issuer": "github",
            "created_at": 10, "expires_at": 600, "state": "active", "credentials": [], "claims": {},
        });
        let Ok(Event::Created { lease }) = serde_json::from_value(serde_json::json!({"t": "created", "lease": lease}))
        else {
            panic!("not a lease record")
        };
        lease
    }

    #[test]
    fn taking_every_shard_in_turn_yields_every_lease_once() {
        let map = LeaseMap::default();
        for i in 0..5_000 {
            assert!(map.insert_new(lease(i), |_| {}));
        }
        let mut ids: Vec<String> = (0..=SHARDS).flat_map(|i| map.shard(i)).map(|l| l.id.to_string()).collect();
        assert_eq!(ids.len(), 5_000, "a lease missed or taken twice");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5_000);
        assert_eq!(map.len(), 5_000);
        let used = (0..SHARDS).filter(|i| !map.shard(*i).is_empty()).count();
        assert!(used > SHARDS / 2, "the leases are not spread over the shards: {used} of {SHARDS} used");
    }

    #[test]
    fn a_shard_taken_by_a_compaction_holds_no_lock_a_change_needs() {
        let map = LeaseMap::default();
        map.insert(lease(1));
        let taken: Vec<Arc<Lease>> = (0..SHARDS).flat_map(|i| map.shard(i)).collect();
        assert_eq!(taken.len(), 1);
        // A write to the lease's shard while the references are held: it would wait forever if
        // taking them had left the shard's read lock held.
        let shard = map.shard_of(map.hash("lse_1"));
        assert!(shard.try_write().is_some(), "the shard is still locked");
        drop(map.get_mut("lse_1"));
        assert!(!map.insert_new(lease(1), |_| panic!("indexed twice")), "a known lease went in again");
        assert!(map.remove_if("lse_1", |_| false).is_none());
        assert!(map.remove_if("lse_1", |l| l.id.as_ref() == "lse_1").is_some());
        assert!(map.get("lse_1").is_none());
        assert_eq!(taken[0].id.as_ref(), "lse_1", "the compaction's reference outlives the removal");
    }
}
