//! The leases by id, in shards that a compaction takes one at a time.
//!
//! Why not a `DashMap`, like the other maps of [`super::memory`]: a compaction needs a
//! reference to every lease, and must not hold a lock that an exchange may want while it
//! encodes them, because its thread runs at a lower priority (a thread set aside with such a
//! lock held stops every exchange that wants it). Taking all million references in one pass
//! took a core for ~80 ms at the start of every compaction, outside the compaction's pacing: a
//! scheduler trace of row 11a's 1M windows showed the compaction's thread on one core for
//! 48 ms at a stretch while the exchanges crowded onto the other, and the window's slow
//! exchanges in that first tenth of a second (docs/benchmarks.md). A `DashMap`'s shards can be
//! reached only through its `raw-api`, whose tables take `unsafe` to walk, and this crate
//! forbids `unsafe`. Here a compaction takes one shard's references at a time
//! ([`LeaseMap::shard`]: about a thousand reference counts, under that shard's read lock only),
//! so the pass is spread over the compaction's paced pieces, as the encoding is.

use super::Lease;
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

/// A shard: the leases, found by their id's hash, computed once per call for both the shard
/// and the slot in it (as a `DashMap` does; a `HashMap` a shard would hash the id again).
type Shard = HashTable<Arc<Lease>>;

pub(super) struct LeaseMap {
    shards: Box<[RwLock<Shard>]>,
    /// Picks a lease's shard. Keyed per process: the ids are the broker's own, but the id of a
    /// lookup comes from a caller, and a known hash would let one aim at a single shard.
    pick: RandomState,
}

impl Default for LeaseMap {
    fn default() -> LeaseMap {
        LeaseMap::with_capacity(0)
    }
}

impl LeaseMap {
    /// Room for `leases` without growing (a replay of that many records).
    pub(super) fn with_capacity(leases: usize) -> LeaseMap {
        let each = leases.div_ceil(SHARDS);
        LeaseMap {
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::with_capacity(each))).collect(),
            pick: RandomState::new(),
        }
    }

    fn hash(&self, id: &str) -> u64 {
        self.pick.hash_one(id)
    }

    /// The shard of an id's hash. Bits 40 and up: a shard's table takes a slot from the low
    /// bits and a tag from the top seven, and within one shard these bits are all the same.
    fn shard_of(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[(hash >> 40) as usize & (SHARDS - 1)]
    }

    fn rehash(&self) -> impl Fn(&Arc<Lease>) -> u64 + '_ {
        |lease| self.hash(&lease.id)
    }

    pub(super) fn get(&self, id: &str) -> Option<MappedRwLockReadGuard<'_, Arc<Lease>>> {
        let hash = self.hash(id);
        RwLockReadGuard::try_map(self.shard_of(hash).read(), |shard| shard.find(hash, |l| *l.id == *id)).ok()
    }

    /// The lease, its shard write-locked while the guard lives.
    pub(super) fn get_mut(&self, id: &str) -> Option<MappedRwLockWriteGuard<'_, Arc<Lease>>> {
        let hash = self.hash(id);
        RwLockWriteGuard::try_map(self.shard_of(hash).write(), |shard| shard.find_mut(hash, |l| *l.id == *id)).ok()
    }

    /// Inserts `lease`, or replaces the one with its id.
    pub(super) fn insert(&self, lease: Arc<Lease>) {
        let hash = self.hash(&lease.id);
        match self.shard_of(hash).write().entry(hash, |l| l.id == lease.id, self.rehash()) {
            Entry::Occupied(mut slot) => *slot.get_mut() = lease,
            Entry::Vacant(slot) => {
                slot.insert(lease);
            }
        }
    }

    /// Inserts `lease` unless its id is known, calling `first` just before, under the shard's
    /// lock (so no one sees the lease before its indexes). False: known, nothing done.
    pub(super) fn insert_new(&self, lease: Arc<Lease>, first: impl FnOnce(&Lease)) -> bool {
        let hash = self.hash(&lease.id);
        match self.shard_of(hash).write().entry(hash, |l| l.id == lease.id, self.rehash()) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                first(&lease);
                slot.insert(lease);
                true
            }
        }
    }

    /// Removes lease `id` if `ended` says so of it, and returns it.
    pub(super) fn remove_if(&self, id: &str, ended: impl FnOnce(&Lease) -> bool) -> Option<Arc<Lease>> {
        let hash = self.hash(id);
        let mut shard = self.shard_of(hash).write();
        let found = shard.find_entry(hash, |l| *l.id == *id).ok()?;
        if ended(found.get()) { Some(found.remove().0) } else { None }
    }

    /// Calls `f` with every lease, one shard at a time, each under its read lock (admin queries
    /// and tests: `f` must not look up a lease).
    pub(super) fn for_each(&self, mut f: impl FnMut(&Arc<Lease>)) {
        for shard in self.shards.iter() {
            shard.read().iter().for_each(&mut f);
        }
    }

    /// A reference to every lease of shard `i` (of [`SHARDS`]; none past the last), taken
    /// under its read lock and returned with no lock held.
    pub(super) fn shard(&self, i: usize) -> Vec<Arc<Lease>> {
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
