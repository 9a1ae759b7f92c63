//! The claims a lease was granted on, kept compact: a million live leases must fit in memory
//! (issue 7's goal: ≤ 1 KiB per lease, claims included).
//!
//! A GitHub token carries ~35 claims, most of them shared by many leases (the repository, its
//! owner, the workflow, the ref, the environment …). A [`ClaimSnapshot`] stores claim names and
//! those shared values as ids into one process-wide, reference-counted string table, and keeps
//! numbers, booleans, short strings and per-job values (`jti`, `check_run_id`, `job_id`) inline in
//! one byte buffer. Cloning a snapshot is an `Arc` increment; the last drop releases its ids, and a
//! string no lease uses any more leaves the table.
//!
//! The table hashes with std's randomly keyed SipHash: claim values such as branch and
//! environment names are chosen by whoever can push, and a predictable hash would let them make
//! every lookup collide (hash flooding).
//!
//! Encoding of the buffer, one entry per claim, in the claims' order:
//!
//! ```text
//! entry = key:varint(table id) value
//! value = 0 null | 1 false | 2 true | 3 int:zigzag varint | 4 len:varint utf8 (inline)
//!       | 5 varint(table id) (shared) | 6 len:varint json (arrays, objects, fractional numbers)
//! ```
//!
//! The journal form ([`ClaimSnapshot::write_to`], [`ClaimSnapshot::read_from`]) is the same with
//! every id replaced by the string itself, so a journal never depends on a process's table.

use crate::identity::Claims;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const INLINE: u8 = 4;
const SHARED: u8 = 5;
const JSON: u8 = 6;

/// Strings up to this long are kept inline: a table id would save little and cost a lookup.
const INLINE_MAX: usize = 8;
/// Claims whose value is unique to one job or token: interning them would only grow the table.
const PER_JOB: [&str; 4] = ["jti", "check_run_id", "job_id", "run_id"];

// ---- the shared string table ---------------------------------------------------------------

struct Slot {
    text: Option<Arc<str>>,
    refs: u32,
}

#[derive(Default)]
struct Table {
    ids: HashMap<Arc<str>, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| Mutex::new(Table::default()));

fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Table {
    fn intern(&mut self, text: &str) -> u32 {
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

    fn retain(&mut self, id: u32) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            slot.refs += 1;
        }
    }

    fn release(&mut self, id: u32) {
        let Some(slot) = self.slots.get_mut(id as usize) else { return };
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs == 0
            && let Some(text) = slot.text.take()
        {
            self.ids.remove(&text);
            self.free.push(id);
        }
    }

    fn text(&self, id: u32) -> &str {
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
#[derive(Default)]
pub struct ReplayMemo {
    ids: HashMap<Box<str>, u32, std::hash::BuildHasherDefault<FxHasher>>,
    names: HashMap<Box<str>, Arc<str>, std::hash::BuildHasherDefault<FxHasher>>,
}

/// Most distinct strings a memo remembers (beyond, lookups go to the table).
const MEMO_MAX: usize = 1 << 16;

impl ReplayMemo {
    fn intern(&mut self, table: &mut Table, text: &str) -> u32 {
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
        self.ids.values().for_each(|id| table.release(*id));
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

// ---- varints -------------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn get_bytes<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(get_varint(input)?).ok()?;
    if input.len() < len {
        return None;
    }
    let (bytes, rest) = input.split_at(len);
    *input = rest;
    Some(bytes)
}

fn get_str<'a>(input: &mut &'a [u8]) -> Option<&'a str> {
    std::str::from_utf8(get_bytes(input)?).ok()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

// ---- the snapshot --------------------------------------------------------------------------

/// A lease's claims: compact, shared strings interned. See the module docs.
#[derive(Clone, Default)]
pub struct ClaimSnapshot(Option<Arc<Encoded>>);

struct Encoded {
    bytes: Box<[u8]>,
}

impl Drop for Encoded {
    fn drop(&mut self) {
        let mut table = table();
        walk_ids(&self.bytes, |id| table.release(id));
    }
}

/// Calls `f` with every table id in an encoded buffer (keys and shared values).
fn walk_ids(mut input: &[u8], mut f: impl FnMut(u32)) {
    while !input.is_empty() {
        let Some(key) = get_varint(&mut input) else { return };
        f(key as u32);
        let Some((&tag, rest)) = input.split_first() else { return };
        input = rest;
        let ok = match tag {
            NULL | FALSE | TRUE => true,
            INT => get_varint(&mut input).is_some(),
            INLINE | JSON => get_bytes(&mut input).is_some(),
            SHARED => match get_varint(&mut input) {
                Some(id) => {
                    f(id as u32);
                    true
                }
                None => false,
            },
            _ => false,
        };
        if !ok {
            return;
        }
    }
}

/// How one value is stored.
enum Stored<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Inline(&'a str),
    Shared(&'a str),
    Json(String),
}

fn classify<'a>(key: &str, value: &'a Value) -> Stored<'a> {
    match value {
        Value::Null => Stored::Null,
        Value::Bool(b) => Stored::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Stored::Int(i),
            None => Stored::Json(n.to_string()),
        },
        Value::String(s) if s.len() <= INLINE_MAX || PER_JOB.contains(&key) => Stored::Inline(s),
        Value::String(s) => Stored::Shared(s),
        other => Stored::Json(other.to_string()),
    }
}

impl ClaimSnapshot {
    /// Encodes `claims`, interning names and shared values.
    pub fn new(claims: &Claims) -> ClaimSnapshot {
        if claims.is_empty() {
            return ClaimSnapshot(None);
        }
        let mut out = Vec::with_capacity(claims.len() * 6);
        let mut table = table();
        for (key, value) in claims {
            put_varint(&mut out, u64::from(table.intern(key)));
            match classify(key, value) {
                Stored::Null => out.push(NULL),
                Stored::Bool(b) => out.push(if b { TRUE } else { FALSE }),
                Stored::Int(i) => {
                    out.push(INT);
                    put_varint(&mut out, zigzag(i));
                }
                Stored::Inline(s) => {
                    out.push(INLINE);
                    put_str(&mut out, s);
                }
                Stored::Shared(s) => {
                    out.push(SHARED);
                    put_varint(&mut out, u64::from(table.intern(s)));
                }
                Stored::Json(text) => {
                    out.push(JSON);
                    put_str(&mut out, &text);
                }
            }
        }
        ClaimSnapshot(Some(Arc::new(Encoded { bytes: out.into_boxed_slice() })))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], |e| &e.bytes)
    }

    /// Every claim, decoded. `f` gets the name and the value.
    fn each(&self, mut f: impl FnMut(&str, Value) -> bool) {
        let table = table();
        let mut input = self.bytes();
        while !input.is_empty() {
            let Some(key) = get_varint(&mut input) else { return };
            let Some((&tag, rest)) = input.split_first() else { return };
            input = rest;
            let value = match tag {
                NULL => Value::Null,
                FALSE => Value::Bool(false),
                TRUE => Value::Bool(true),
                INT => match get_varint(&mut input) {
                    Some(v) => Value::from(unzigzag(v)),
                    None => return,
                },
                INLINE => match get_str(&mut input) {
                    Some(s) => Value::String(s.to_string()),
                    None => return,
                },
                SHARED => match get_varint(&mut input) {
                    Some(id) => Value::String(table.text(id as u32).to_string()),
                    None => return,
                },
                JSON => match get_str(&mut input) {
                    Some(s) => serde_json::from_str(s).unwrap_or(Value::Null),
                    None => return,
                },
                _ => return,
            };
            if !f(table.text(key as u32), value) {
                return;
            }
        }
    }

    /// One claim's value (`None` when the token did not carry it).
    pub fn get(&self, name: &str) -> Option<Value> {
        let mut found = None;
        self.each(|key, value| {
            if key == name {
                found = Some(value);
                false
            } else {
                true
            }
        });
        found
    }

    /// The claims as a map, for the policy (re-evaluation) and the admin API.
    pub fn to_claims(&self) -> Claims {
        let mut map = Map::new();
        self.each(|key, value| {
            map.insert(key.to_string(), value);
            true
        });
        map
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Heap bytes this snapshot holds on its own (shared strings not counted).
    pub fn heap_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |e| e.bytes.len() + 2 * std::mem::size_of::<usize>() + 16)
    }

    /// The journal form: self-contained (every string written out).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let table = table();
        let mut input = self.bytes();
        let mut entries = Vec::new();
        // Two passes would need the count first; entries are collected as byte ranges instead.
        while !input.is_empty() {
            let Some(key) = get_varint(&mut input) else { break };
            let mut entry = Vec::new();
            put_str(&mut entry, table.text(key as u32));
            let Some((&tag, rest)) = input.split_first() else { break };
            input = rest;
            match tag {
                SHARED => {
                    let Some(id) = get_varint(&mut input) else { break };
                    entry.push(INLINE);
                    put_str(&mut entry, table.text(id as u32));
                }
                NULL | FALSE | TRUE => entry.push(tag),
                INT => {
                    let Some(v) = get_varint(&mut input) else { break };
                    entry.push(INT);
                    put_varint(&mut entry, v);
                }
                INLINE | JSON => {
                    let Some(bytes) = get_bytes(&mut input) else { break };
                    entry.push(tag);
                    put_varint(&mut entry, bytes.len() as u64);
                    entry.extend_from_slice(bytes);
                }
                _ => break,
            }
            entries.push(entry);
        }
        put_varint(out, entries.len() as u64);
        for e in entries {
            out.extend_from_slice(&e);
        }
    }

    /// Reads the journal form, interning as [`ClaimSnapshot::new`] does (one table lock for the
    /// whole snapshot: replay reads a million of these). `None` if the bytes are not one.
    pub fn read_from(input: &mut &[u8], memo: &mut ReplayMemo) -> Option<ClaimSnapshot> {
        let count = usize::try_from(get_varint(input)?).ok()?;
        if count == 0 {
            return Some(ClaimSnapshot(None));
        }
        // Bounded by the bytes left: a corrupt count cannot make us allocate a huge buffer.
        let mut out = Vec::with_capacity((count * 6).min(input.len() + 16));
        let mut table = table();
        // On a bad entry, give back the ids taken so far (they are all in `out`).
        let fail = |table: &mut Table, out: &[u8]| {
            walk_ids(out, |id| table.release(id));
            None::<ClaimSnapshot>
        };
        for _ in 0..count {
            let Some(key) = get_str(input) else { return fail(&mut table, &out) };
            let id = memo.intern(&mut table, key);
            put_varint(&mut out, u64::from(id));
            let Some((&tag, rest)) = input.split_first() else { return fail(&mut table, &out) };
            *input = rest;
            match tag {
                NULL | FALSE | TRUE => out.push(tag),
                INT => {
                    let Some(v) = get_varint(input) else { return fail(&mut table, &out) };
                    out.push(INT);
                    put_varint(&mut out, v);
                }
                INLINE => {
                    let Some(s) = get_str(input) else { return fail(&mut table, &out) };
                    if s.len() <= INLINE_MAX || PER_JOB.contains(&table.text(id)) {
                        out.push(INLINE);
                        put_str(&mut out, s);
                    } else {
                        let shared = memo.intern(&mut table, s);
                        out.push(SHARED);
                        put_varint(&mut out, u64::from(shared));
                    }
                }
                JSON => {
                    let Some(bytes) = get_bytes(input) else { return fail(&mut table, &out) };
                    out.push(JSON);
                    put_varint(&mut out, bytes.len() as u64);
                    out.extend_from_slice(bytes);
                }
                _ => return fail(&mut table, &out),
            }
        }
        Some(ClaimSnapshot(Some(Arc::new(Encoded { bytes: out.into_boxed_slice() }))))
    }
}

impl From<&Claims> for ClaimSnapshot {
    fn from(claims: &Claims) -> Self {
        ClaimSnapshot::new(claims)
    }
}

impl PartialEq for ClaimSnapshot {
    fn eq(&self, other: &Self) -> bool {
        self.to_claims() == other.to_claims()
    }
}

impl fmt::Debug for ClaimSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.to_claims()).finish()
    }
}

impl Serialize for ClaimSnapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_claims().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ClaimSnapshot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ClaimSnapshot::new(&Claims::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims() -> Claims {
        let Value::Object(map) = json!({
            "jti": "8a1c2f0e-7c55-4b0e-9d7e-2f5a3b1c9e01", "iat": 1632493567, "neg": -5,
            "repository": "octo-org/octo-repo-snapshot-test", "repository_id": "74", "ref_protected": "true",
            "flag": true, "none": null, "aud": ["a", "b"], "ratio": 0.5, "groups": {"x": 1},
            "unicode": "ünïcødé-branch-name-long",
        }) else {
            unreachable!()
        };
        map
    }

    #[test]
    fn a_snapshot_gives_back_every_claim_as_it_was() {
        let c = claims();
        let s = ClaimSnapshot::new(&c);
        assert_eq!(s.to_claims(), c);
        assert_eq!(s.get("repository"), Some(json!("octo-org/octo-repo-snapshot-test")));
        assert_eq!(s.get("iat"), Some(json!(1632493567)));
        assert_eq!(s.get("neg"), Some(json!(-5)));
        assert_eq!(s.get("missing"), None);
        assert_eq!(s.get("none"), Some(Value::Null));
        assert_eq!(serde_json::to_value(&s).unwrap(), Value::Object(c.clone()));
        let back: ClaimSnapshot = serde_json::from_value(Value::Object(c.clone())).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_journal_form_round_trips_without_the_table() {
        let c = claims();
        let s = ClaimSnapshot::new(&c);
        let mut bytes = Vec::new();
        s.write_to(&mut bytes);
        assert!(
            bytes.windows(b"octo-org/octo-repo-snapshot-test".len()).any(|w| w == b"octo-org/octo-repo-snapshot-test"),
            "shared strings are written out"
        );
        let mut input = bytes.as_slice();
        let read = ClaimSnapshot::read_from(&mut input, &mut ReplayMemo::default()).unwrap();
        assert!(input.is_empty());
        assert_eq!(read.to_claims(), c);
        // Truncated input is refused, never misread.
        for cut in 0..bytes.len() {
            let mut short = &bytes[..cut];
            assert!(ClaimSnapshot::read_from(&mut short, &mut ReplayMemo::default()).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn shared_strings_are_stored_once_and_leave_the_table_with_their_last_lease() {
        let mut c = Claims::new();
        c.insert("snapshot_test_unique_key".into(), json!("a-value-only-this-test-uses-0123456789"));
        let a = ClaimSnapshot::new(&c);
        let b = ClaimSnapshot::new(&c);
        let held = |text: &str| table().ids.contains_key(text);
        assert!(held("a-value-only-this-test-uses-0123456789"));
        assert_eq!(a.bytes(), b.bytes(), "the same ids: the string is stored once");
        let a2 = a.clone();
        drop(a);
        drop(b);
        assert!(held("a-value-only-this-test-uses-0123456789"), "a clone still holds it");
        drop(a2);
        assert!(!held("a-value-only-this-test-uses-0123456789"));
        assert!(!held("snapshot_test_unique_key"));
    }
}
