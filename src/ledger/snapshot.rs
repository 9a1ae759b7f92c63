//! The claims a lease was granted on, kept compact: a million live leases must fit in memory
//! (issue 7's goal: ≤ 1 KiB per lease, claims included).
//!
//! A GitHub token carries ~35 claims, most of them shared by many leases (the repository, its
//! owner, the workflow, the ref, the environment …). A [`ClaimSnapshot`] stores claim names and
//! those shared values as ids into one process-wide, reference-counted string table
//! ([`super::strings`]), and keeps numbers, booleans, short strings and per-job values (`jti`,
//! `check_run_id`, `job_id`) inline in one byte buffer. Cloning a snapshot is an `Arc` increment;
//! the last drop releases its ids, and a string no lease uses any more leaves the table.
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
//! every id replaced by the string itself, so a journal never depends on a process's table. A
//! compacted journal uses a third form ([`ClaimSnapshot::write_refs`], [`ClaimSnapshot::read_refs`]):
//! every id replaced by the string's id in that file's own dictionary ([`FileDict`]), whose
//! strings the file itself defines before their first use.

use super::codec::{get_bytes, get_str, get_u8, get_varint, put_bytes, put_str, put_varint, unzigzag, zigzag};
use super::strings::{FileDict, ReplayMemo, Table, table};
use crate::claims::Claims;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

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

/// A lease's claims: compact, shared strings interned. See the module docs.
#[derive(Clone, Default)]
pub struct ClaimSnapshot(Option<Arc<Encoded>>);

struct Encoded {
    bytes: Box<[u8]>,
    /// Its entries: a journal form starts with the count, and a compaction writes a million
    /// of them; counting would walk every entry twice. (Free in size: the `Arc`'s allocation
    /// is in the same allocator class with it or without it.)
    count: u32,
}

impl Drop for Encoded {
    fn drop(&mut self) {
        let mut table = table();
        walk_ids(&self.bytes, |id| table.release(id));
    }
}

/// Calls `f` with every table id in an encoded buffer (keys and shared values).
fn walk_ids(bytes: &[u8], mut f: impl FnMut(u32)) {
    for (key, value) in Entries(bytes) {
        f(key);
        if let Entry::Shared(id) = value {
            f(id);
        }
    }
}

/// One encoded value, as stored.
enum Entry<'a> {
    /// `NULL`, `FALSE` or `TRUE`: the tag is the value.
    Tag(u8),
    /// Zigzag-encoded.
    Int(u64),
    Inline(&'a [u8]),
    Shared(u32),
    Json(&'a [u8]),
}

/// The entries of an encoded buffer: (key id, value). Stops at the first malformed entry (the
/// buffer is this process's own, so that does not happen).
struct Entries<'a>(&'a [u8]);

impl<'a> Iterator for Entries<'a> {
    type Item = (u32, Entry<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let input = &mut self.0;
        let key = get_varint(input)? as u32;
        let value = match get_u8(input)? {
            tag @ (NULL | FALSE | TRUE) => Entry::Tag(tag),
            INT => Entry::Int(get_varint(input)?),
            INLINE => Entry::Inline(get_bytes(input)?),
            SHARED => Entry::Shared(get_varint(input)? as u32),
            JSON => Entry::Json(get_bytes(input)?),
            _ => return None,
        };
        Some((key, value))
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

/// One entry of [`ClaimSnapshot::write_refs`]'s form, copied from `input` to `out` as stored,
/// with its ids taken (retained) from the file's dictionary in `memo`. `None` if it is malformed
/// or uses a string the file has not defined. It is parsed whole before any id is taken, so a bad
/// entry takes none and leaves `out` at an entry's end.
fn read_ref_entry(input: &mut &[u8], memo: &ReplayMemo, out: &mut Vec<u8>, table: &mut Table) -> Option<()> {
    let lookup = |input: &mut &[u8]| memo.defined(usize::try_from(get_varint(input)?).ok()?);
    let key = lookup(input)?;
    let mut shared = None;
    put_varint(out, u64::from(key));
    match get_u8(input)? {
        tag @ (NULL | FALSE | TRUE) => out.push(tag),
        INT => {
            out.push(INT);
            put_varint(out, get_varint(input)?);
        }
        INLINE => {
            out.push(INLINE);
            put_str(out, get_str(input)?);
        }
        SHARED => {
            let id = lookup(input)?;
            out.push(SHARED);
            put_varint(out, u64::from(id));
            shared = Some(id);
        }
        JSON => {
            out.push(JSON);
            put_bytes(out, get_bytes(input)?);
        }
        _ => return None,
    }
    table.retain(key);
    if let Some(id) = shared {
        table.retain(id);
    }
    Some(())
}

/// The journal form of a value ([`ClaimSnapshot::write_to`]): `Entry` with the string written
/// out instead of an id.
enum Written<'a> {
    Tag(u8),
    Int(u64),
    Inline(&'a str),
    Json(&'a [u8]),
}

/// One entry of the journal form: (name, value). `None` if it is malformed.
fn read_written<'a>(input: &mut &'a [u8]) -> Option<(&'a str, Written<'a>)> {
    let key = get_str(input)?;
    let value = match get_u8(input)? {
        tag @ (NULL | FALSE | TRUE) => Written::Tag(tag),
        INT => Written::Int(get_varint(input)?),
        INLINE => Written::Inline(get_str(input)?),
        JSON => Written::Json(get_bytes(input)?),
        _ => return None,
    };
    Some((key, value))
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
        // A token of at most 16 KiB holds a few hundred claims at most.
        let count = u32::try_from(claims.len()).unwrap_or(u32::MAX);
        ClaimSnapshot(Some(Arc::new(Encoded { bytes: out.into_boxed_slice(), count })))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], |e| &e.bytes)
    }

    /// Every claim, decoded. `f` gets the name and the value.
    fn each(&self, mut f: impl FnMut(&str, Value) -> bool) {
        let table = table();
        for (key, entry) in Entries(self.bytes()) {
            let value = match entry {
                Entry::Tag(FALSE) => Value::Bool(false),
                Entry::Tag(TRUE) => Value::Bool(true),
                Entry::Tag(_) => Value::Null,
                Entry::Int(v) => Value::from(unzigzag(v)),
                Entry::Inline(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
                Entry::Shared(id) => Value::String(table.text(id).to_string()),
                Entry::Json(bytes) => serde_json::from_slice(bytes).unwrap_or(Value::Null),
            };
            if !f(table.text(key), value) {
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
        // A shared value is written out, as an inline one.
        self.write_entries(out, INLINE, |out, id| put_str(out, table.text(id)));
    }

    /// The compacted journal's form: [`ClaimSnapshot::write_to`] with every name and shared
    /// value written as its id in `dict`. Strings new to the file are appended to `defs`;
    /// returns how many.
    pub fn write_refs(&self, dict: &mut FileDict, defs: &mut Vec<u8>, out: &mut Vec<u8>) -> u64 {
        let mut table = None;
        let mut new = 0;
        self.write_entries(out, SHARED, |out, id| {
            put_varint(out, u64::from(dict.file_id(&mut table, id, defs, &mut new)));
        });
        new
    }

    /// The entries in a journal form: `string` writes each table id (every key, and a shared
    /// value after the tag `shared`); everything else is copied as it is stored.
    fn write_entries(&self, out: &mut Vec<u8>, shared: u8, mut string: impl FnMut(&mut Vec<u8>, u32)) {
        put_varint(out, u64::from(self.0.as_ref().map_or(0, |e| e.count)));
        for (key, entry) in Entries(self.bytes()) {
            string(out, key);
            match entry {
                Entry::Tag(tag) => out.push(tag),
                Entry::Int(v) => {
                    out.push(INT);
                    put_varint(out, v);
                }
                Entry::Inline(bytes) => {
                    out.push(INLINE);
                    put_bytes(out, bytes);
                }
                Entry::Shared(id) => {
                    out.push(shared);
                    string(out, id);
                }
                Entry::Json(bytes) => {
                    out.push(JSON);
                    put_bytes(out, bytes);
                }
            }
        }
    }

    /// Reads [`ClaimSnapshot::write_refs`]'s form, the file's dictionary so far being in `memo`.
    /// `None` if the bytes are not one, or refer to a string the file has not defined.
    pub fn read_refs(input: &mut &[u8], memo: &ReplayMemo) -> Option<ClaimSnapshot> {
        let count = u32::try_from(get_varint(input)?).ok()?;
        if count == 0 {
            return Some(ClaimSnapshot(None));
        }
        // Bounded by the bytes left: a corrupt count cannot make us allocate a huge buffer.
        let mut out = Vec::with_capacity((count as usize * 6).min(input.len() + 16));
        let mut table = table();
        for _ in 0..count {
            let start = out.len();
            if read_ref_entry(input, memo, &mut out, &mut table).is_none() {
                // Give back the ids taken so far: every complete entry before this one.
                out.truncate(start);
                walk_ids(&out, |id| table.release(id));
                return None;
            }
        }
        Some(ClaimSnapshot(Some(Arc::new(Encoded { bytes: out.into_boxed_slice(), count }))))
    }

    /// Reads the journal form, interning as [`ClaimSnapshot::new`] does (one table lock for the
    /// whole snapshot: replay reads a million of these). `None` if the bytes are not one.
    pub fn read_from(input: &mut &[u8], memo: &mut ReplayMemo) -> Option<ClaimSnapshot> {
        let count = u32::try_from(get_varint(input)?).ok()?;
        if count == 0 {
            return Some(ClaimSnapshot(None));
        }
        // Bounded by the bytes left: a corrupt count cannot make us allocate a huge buffer.
        let mut out = Vec::with_capacity((count as usize * 6).min(input.len() + 16));
        let mut table = table();
        // On a bad entry, give back the ids taken so far. An entry is parsed whole before
        // anything of it is interned, so they are all in `out`, in complete entries.
        let fail = |table: &mut Table, out: &[u8]| {
            walk_ids(out, |id| table.release(id));
            None::<ClaimSnapshot>
        };
        for _ in 0..count {
            let Some((key, value)) = read_written(input) else { return fail(&mut table, &out) };
            put_varint(&mut out, u64::from(memo.intern(&mut table, key)));
            match value {
                Written::Tag(tag) => out.push(tag),
                Written::Int(v) => {
                    out.push(INT);
                    put_varint(&mut out, v);
                }
                // The same choice as `classify`: long, shared values go to the table.
                Written::Inline(text) if text.len() > INLINE_MAX && !PER_JOB.contains(&key) => {
                    out.push(SHARED);
                    put_varint(&mut out, u64::from(memo.intern(&mut table, text)));
                }
                Written::Inline(text) => {
                    out.push(INLINE);
                    put_str(&mut out, text);
                }
                Written::Json(bytes) => {
                    out.push(JSON);
                    put_bytes(&mut out, bytes);
                }
            }
        }
        Some(ClaimSnapshot(Some(Arc::new(Encoded { bytes: out.into_boxed_slice(), count }))))
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
    use crate::ledger::strings::interned;
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
    fn a_cut_journal_form_gives_back_every_string_it_took() {
        let mut c = Claims::new();
        c.insert("snapshot_cut_test_key_one".into(), json!("a-value-only-the-cut-test-uses-0123456789"));
        c.insert("snapshot_cut_test_key_two".into(), json!(7));
        let mut bytes = Vec::new();
        ClaimSnapshot::new(&c).write_to(&mut bytes);
        for cut in 0..bytes.len() {
            let mut short = &bytes[..cut];
            assert!(ClaimSnapshot::read_from(&mut short, &mut ReplayMemo::default()).is_none());
        }
        let held = interned;
        for text in
            ["snapshot_cut_test_key_one", "snapshot_cut_test_key_two", "a-value-only-the-cut-test-uses-0123456789"]
        {
            assert!(!held(text), "`{text}` is still referenced after every read failed");
        }
    }

    #[test]
    fn the_dictionary_form_round_trips_and_every_string_leaves_the_table_with_its_last_holder() {
        let mut c = Claims::new();
        c.insert("snapshot_dict_test_key".into(), json!("a-value-only-the-dictionary-test-uses-0123"));
        c.insert("snapshot_dict_test_int".into(), json!(-9));
        c.insert("jti".into(), json!("per-job-inline-value-0123456789"));
        let held = interned;
        let (mut dict, mut defs, mut bytes) = (FileDict::default(), Vec::new(), Vec::new());
        let written = ClaimSnapshot::new(&c);
        assert_eq!(written.write_refs(&mut dict, &mut defs, &mut bytes), 4, "three names and one shared value");
        let mut again = (Vec::new(), Vec::new());
        assert_eq!(written.write_refs(&mut dict, &mut again.0, &mut again.1), 0, "already in the file");
        assert_eq!(again.1, bytes);
        drop(written);
        assert!(
            held("a-value-only-the-dictionary-test-uses-0123"),
            "the dictionary holds it while the file is written"
        );
        drop(dict);
        assert!(!held("a-value-only-the-dictionary-test-uses-0123"));

        let mut defined = defs.as_slice();
        let texts: Vec<&str> = (0..4).map(|_| get_str(&mut defined).unwrap()).collect();
        let mut memo = ReplayMemo::default();
        memo.define(texts);
        let read = ClaimSnapshot::read_refs(&mut bytes.as_slice(), &memo).unwrap();
        assert_eq!(read.to_claims(), c);
        for cut in 0..bytes.len() {
            assert!(ClaimSnapshot::read_refs(&mut &bytes[..cut], &memo).is_none(), "cut at {cut}");
        }
        drop(memo);
        assert!(held("snapshot_dict_test_key"), "the replayed lease holds it");
        drop(read);
        for text in ["snapshot_dict_test_key", "snapshot_dict_test_int", "a-value-only-the-dictionary-test-uses-0123"] {
            assert!(!held(text), "`{text}` is still referenced after its last holder dropped");
        }
    }

    #[test]
    fn shared_strings_are_stored_once_and_leave_the_table_with_their_last_lease() {
        let mut c = Claims::new();
        c.insert("snapshot_test_unique_key".into(), json!("a-value-only-this-test-uses-0123456789"));
        let a = ClaimSnapshot::new(&c);
        let b = ClaimSnapshot::new(&c);
        let held = interned;
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
