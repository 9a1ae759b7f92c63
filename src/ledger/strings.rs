//! The process-wide string table behind every [`ClaimSnapshot`](super::ClaimSnapshot): claim
//! names and shared claim values, each stored once, by id, and reference-counted. A snapshot
//! holds one reference to every id it uses; the last holder's drop releases it, and a string no
//! lease uses any more leaves the table. Next to it, the two helpers for the journal's forms of
//! a snapshot: the replay's memo in front of the table ([`ReplayMemo`]) and the writer's half of
//! a compacted journal's string dictionary ([`FileDict`]).
//!
//! The table hashes with std's randomly keyed SipHash: claim values such as branch and
//! environment names are chosen by whoever can push, and a predictable hash would let them make
//! every lookup collide (hash flooding).

use super::codec::put_str;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

struct Slot {
    text: Option<Arc<str>>,
    refs: u32,
}

#[derive(Default)]
pub(super) struct Table {
    ids: HashMap<Arc<str>, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| Mutex::new(Table::default()));

pub(super) fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Table {
    pub(super) fn intern(&mut self, text: &str) -> u32 {
        if let Some(&id) = self.ids.get(text) {
            self.retain(id);
            return id;
        }
        let text: Arc<str> = Arc::from(text);
        let slot = Slot { text: Some(text.clone()), refs: 1 };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(text, id);
        id
    }

    pub(super) fn retain(&mut self, id: u32) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            slot.refs += 1;
        }
    }

    pub(super) fn release(&mut self, id: u32) {
        let Some(slot) = self.slots.get_mut(id as usize) else { return };
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs == 0
            && let Some(text) = slot.text.take()
        {
            self.ids.remove(&text);
            self.free.push(id);
        }
    }

    pub(super) fn text(&self, id: u32) -> &str {
        self.slots.get(id as usize).and_then(|s| s.text.as_deref()).unwrap_or_default()
    }
}

/// A replay's memo in front of the shared table: a journal repeats the same few hundred names
/// and values a million times, and looking each up in the table (a lock and a SipHash each) was
/// most of the replay time. The memo holds one reference of its own to every id it remembers,
/// so an id cannot be freed and reused while it is remembered; dropping the memo gives them back.
///
/// FxHash here, not SipHash: the memo lives for one replay of the broker's own journal, whose
/// strings came through verified tokens and were already interned once; and it is bounded by
/// [`MEMO_MAX`].
///
/// It also holds the file's string dictionary while a compacted journal is read
/// ([`ClaimSnapshot::read_refs`](super::ClaimSnapshot::read_refs)): file id → table id, one
/// reference each.
#[derive(Default)]
pub struct ReplayMemo {
    ids: HashMap<Box<str>, u32, std::hash::BuildHasherDefault<FxHasher>>,
    names: HashMap<Box<str>, Arc<str>, std::hash::BuildHasherDefault<FxHasher>>,
    file: Vec<u32>,
}

/// Most distinct strings a memo remembers (beyond, lookups go to the table).
const MEMO_MAX: usize = 1 << 16;

impl ReplayMemo {
    pub(super) fn intern(&mut self, table: &mut Table, text: &str) -> u32 {
        if let Some(&id) = self.ids.get(text) {
            table.retain(id);
            return id;
        }
        let id = table.intern(text);
        if self.ids.len() < MEMO_MAX {
            table.retain(id); // the memo's own reference
            self.ids.insert(text.into(), id);
        }
        id
    }

    /// Adds the next strings of the file's dictionary (the definitions a compacted journal's
    /// record carries before the lease that first uses them).
    pub fn define<'a>(&mut self, texts: impl IntoIterator<Item = &'a str>) {
        let mut table = table();
        for text in texts {
            let id = table.intern(text); // the dictionary's own reference
            self.file.push(id);
        }
    }

    /// The table id of the file's string `file_id` (`None`: the file has not defined it).
    pub(super) fn defined(&self, file_id: usize) -> Option<u32> {
        self.file.get(file_id).copied()
    }

    /// [`super::name::intern`], memoised.
    pub fn name(&mut self, text: &str) -> Arc<str> {
        if let Some(found) = self.names.get(text) {
            return found.clone();
        }
        let name = super::name::intern(text);
        if self.names.len() < MEMO_MAX {
            self.names.insert(text.into(), name.clone());
        }
        name
    }
}

impl Drop for ReplayMemo {
    fn drop(&mut self) {
        let mut table = table();
        self.ids.values().chain(&self.file).for_each(|id| table.release(*id));
    }
}

/// The writer's half of a compacted journal's string dictionary
/// ([`ClaimSnapshot::write_refs`](super::ClaimSnapshot::write_refs)).
///
/// A compaction snapshot writes each claim name and shared value once, where a lease first uses
/// it; later leases refer to it by its file id, in order of first use. A million leases that
/// repeat the same few hundred strings then cost a third of the bytes, and replaying them is
/// mostly looking ids up in a vector instead of hashing strings.
///
/// Indexed by table id (ours, dense: no hashing of attacker-chosen strings). It holds one
/// reference to every table id it has given a file id, so no id can be freed and reused for
/// another string while the file is being written; dropping it gives them back.
#[derive(Default)]
pub struct FileDict {
    /// Table id → file id + 1 (0: not in this file yet).
    file_ids: Vec<u32>,
    next: u32,
}

impl FileDict {
    /// The file id of table id `id`, writing its string to `defs` (and counting it in `new`)
    /// the first time. The table's lock is taken (into `table`) only then: a compaction
    /// encodes a million leases whose strings are nearly all in the file already, and every
    /// exchange takes that lock, so a compaction thread set aside by the scheduler while
    /// holding it would stop them all. (`id` stays valid without the lock: the lease being
    /// encoded holds a reference to it.)
    pub(super) fn file_id(
        &mut self,
        table: &mut Option<MutexGuard<'static, Table>>,
        id: u32,
        defs: &mut Vec<u8>,
        new: &mut u64,
    ) -> u32 {
        let at = id as usize;
        if at >= self.file_ids.len() {
            self.file_ids.resize(at + 1, 0);
        }
        if self.file_ids[at] == 0 {
            let table = table.get_or_insert_with(self::table);
            table.retain(id);
            self.next += 1;
            self.file_ids[at] = self.next;
            put_str(defs, table.text(id));
            *new += 1;
        }
        self.file_ids[at] - 1
    }
}

impl Drop for FileDict {
    fn drop(&mut self) {
        let mut table = table();
        for (id, file_id) in self.file_ids.iter().enumerate() {
            if *file_id != 0 {
                table.release(id as u32);
            }
        }
    }
}

/// rustc's FxHash: a multiply and a rotate per word.
#[derive(Default)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Distinct strings the table holds now (for tests and figures).
pub fn table_len() -> usize {
    table().ids.len()
}

/// Whether the table holds `text` now (for tests of who gives back what).
#[cfg(test)]
pub(super) fn interned(text: &str) -> bool {
    table().ids.contains_key(text)
}
