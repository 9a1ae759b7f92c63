//! The lease journal: an append-only file of length-prefixed, checksummed records.
//!
//! ```text
//! file    = MAGIC record*
//! record  = len:u32 LE | crc32(len ‖ payload):u32 LE | payload
//! payload = 0x01 lease claims            — `Event::Created`, as appended by an exchange
//!         | 0x02 n:varint str*n lease refs — `Event::Created`, as written by compaction
//!         | JSON of one `Event`            — every other event (starts with `{`)
//! lease   = id job policy issuer (str) | created expires (zigzag varint) | state:u8
//!         | reason (0 | 1 str) | attempts (varint) | next_attempt (zigzag varint)
//!         | last_error (0 | 1 str) | n:varint credential*n
//! claims  = the claims, every string written out (ClaimSnapshot::write_to)
//! refs    = the claims, names and shared values as ids into the file's dictionary
//!           (ClaimSnapshot::write_refs)
//! credential = name kind (str) | revocation:u8 | backend data (str)
//! str     = len:varint utf8
//! ```
//!
//! Leases are binary because replay must be fast (issue 7: a million leases in ≤ 2 s) and JSON
//! of a ~35-claim lease costs several µs to parse. Journals written with JSON `Created` records
//! (before this format) still replay.
//!
//! **The dictionary.** A compacted journal holds every live lease, and a million leases repeat
//! the same few hundred claim names and values. Compaction ([`SnapshotEncoder`]) writes each such
//! string once: a `0x02` record first defines the strings no earlier record of the file used
//! (the file's dictionary gives them the next ids, 0, 1, 2 … in order), then refers to them by
//! id. That makes a compacted journal about a third of the self-contained form and its replay
//! mostly vector lookups. The dictionary lives in the file, never in a process: replay rebuilds
//! it record by record, and an id the file has not defined is a corrupt record. Appends stay
//! self-contained (`0x01`): a dictionary across appends would have to be rolled back with every
//! failed write, and the tail after a compaction is at most `compact_bytes` long.
//!
//! A crash can leave a torn tail (a record cut short, or whose bytes never reached the disk): it
//! is truncated at start. A bad record *before* the tail is corruption, not a crash: the start
//! stops with the byte offset, because silently dropping it could forget a lease that still
//! needs revoking. One writer thread appends; concurrent callers share one `fsync` (group commit)
//! and each learns whether its records are durable.

use super::Event;
use super::codec::{get_str, get_varint, put_varint};
use super::snapshot::{ClaimSnapshot, FileDict, ReplayMemo};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::mpsc::{self, WeakSender};
use tokio::sync::oneshot;

const MAGIC: &[u8; 8] = b"EPHJRNL1";
/// No single event is anywhere near this; a larger length field means a corrupt header.
const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;
/// Events per batch handed from the replay's decoder thread to its applier.
const REPLAY_BATCH: usize = 1024;
/// How many queued appends one fsync may cover.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalError(pub String);

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What reading a journal found.
#[derive(Debug)]
pub struct Replayed {
    pub events: Vec<Event>,
    /// Bytes cut from a torn tail (0 when the file ended cleanly).
    pub truncated: u64,
    /// The file's length afterwards: where the next append lands, and what a failed append is
    /// cut back to.
    pub len: u64,
}

/// Where the journal's bytes go. [`FileStorage`] is the real one; tests wrap it to inject write
/// failures a real disk produces only rarely (ENOSPC, EIO).
pub trait Storage: Send + 'static {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    /// Cuts the file back to `len` bytes (after a failed append left partial bytes).
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    /// The file's bytes in `from..to` (compaction carries the records since the last one over).
    fn read_range(&mut self, from: u64, to: u64) -> std::io::Result<Vec<u8>>;
    /// Starts the file a compaction writes, next to the journal. It is written and synced on a
    /// thread of its own while appends go on to the journal.
    fn start_replacement(&mut self) -> std::io::Result<Box<dyn Replacement>>;
    /// Makes a written and synced replacement the journal: atomically (rename) and durably (the
    /// directory synced); appends then go to it.
    fn install(&mut self, replacement: Box<dyn Replacement>) -> std::io::Result<()>;
}

/// The file a compaction writes ([`Storage::start_replacement`]).
pub trait Replacement: Send + 'static {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
}

impl Replacement for File {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_all()
    }
}

pub struct FileStorage {
    path: PathBuf,
    file: File,
}

impl FileStorage {
    /// Opens (or creates) the journal at `path`, reads every record, truncates a torn tail, and
    /// returns the storage positioned for appending.
    pub fn open(path: &Path) -> Result<(FileStorage, Replayed), JournalError> {
        let mut events = Vec::new();
        let (storage, mut replayed) = FileStorage::open_into(path, |_| {}, |batch| events.extend(batch))?;
        replayed.events = events;
        Ok((storage, replayed))
    }

    /// [`FileStorage::open`], replaying into `apply` instead of a vector: records are decoded on
    /// a second thread while this one applies them, in order, in batches. `reserve` first gets
    /// the number of records, for sizing. `Replayed::events` is empty.
    pub fn open_into(
        path: &Path,
        reserve: impl FnOnce(usize),
        mut apply: impl FnMut(Vec<Event>),
    ) -> Result<(FileStorage, Replayed), JournalError> {
        let err = |what: &str, e: std::io::Error| JournalError(format!("journal {}: {what}: {e}", path.display()));
        let mut file =
            OpenOptions::new().read(true).append(true).create(true).open(path).map_err(|e| err("cannot open", e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut bytes).map_err(|e| err("cannot read", e))?;
        reserve(count_records(&bytes));
        let good_len = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Event>>(8);
            let decoder = scope.spawn(|| {
                let mut batch = Vec::with_capacity(REPLAY_BATCH);
                let result = decode_with(&bytes, |event| {
                    batch.push(event);
                    if batch.len() == REPLAY_BATCH {
                        let _ = tx.send(std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH)));
                    }
                });
                let _ = tx.send(batch);
                drop(tx);
                result
            });
            for batch in rx {
                apply(batch);
            }
            decoder.join().unwrap_or_else(|_| Err("the journal decoder panicked".into()))
        })
        .map_err(|e| JournalError(format!("journal {}: {e}", path.display())))?;
        let events = Vec::new();
        let truncated = bytes.len() as u64 - good_len;
        if good_len == 0 {
            // New, or a crash while its magic was being written: (re)initialise it, so nothing is
            // ever appended to a file without the magic.
            file.set_len(0)
                .and_then(|()| file.write_all(MAGIC))
                .and_then(|()| file.sync_all())
                .map_err(|e| err("cannot initialise", e))?;
            sync_dir(path).map_err(|e| err("cannot sync its directory", e))?;
            let replayed = Replayed { events, truncated, len: MAGIC.len() as u64 };
            return Ok((FileStorage { path: path.to_path_buf(), file }, replayed));
        }
        if truncated > 0 {
            file.set_len(good_len).and_then(|()| file.sync_all()).map_err(|e| err("cannot truncate a torn tail", e))?;
            file.seek(SeekFrom::End(0)).map_err(|e| err("cannot seek", e))?;
        }
        Ok((FileStorage { path: path.to_path_buf(), file }, Replayed { events, truncated, len: good_len }))
    }
}

impl Storage for FileStorage {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.seek(SeekFrom::End(0)).map(|_| ())
    }

    fn start_replacement(&mut self) -> std::io::Result<Box<dyn Replacement>> {
        let tmp = self.path.with_extension("compact");
        Ok(Box::new(OpenOptions::new().write(true).create(true).truncate(true).open(tmp)?))
    }

    fn install(&mut self, replacement: Box<dyn Replacement>) -> std::io::Result<()> {
        drop(replacement);
        std::fs::rename(self.path.with_extension("compact"), &self.path)?;
        sync_dir(&self.path)?;
        self.file = OpenOptions::new().read(true).append(true).open(&self.path)?;
        Ok(())
    }

    fn read_range(&mut self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let len = usize::try_from(to.saturating_sub(from)).map_err(std::io::Error::other)?;
        let mut bytes = vec![0; len];
        self.file.read_exact_at(&mut bytes, from)?;
        Ok(bytes)
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// Encodes events as self-contained records (without the file magic): what appends write.
pub fn encode(events: &[Event], out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    for event in events {
        payload.clear();
        match event {
            Event::Created { lease } => {
                payload.push(BINARY_LEASE);
                binary::write_lease(lease, &mut payload);
                lease.claims.write_to(&mut payload);
            }
            other => json_payload(other, &mut payload),
        }
        push_record(out, &payload);
    }
}

/// Encodes a compaction snapshot: leases as `0x02` records that share one string dictionary
/// (module docs). One encoder per file, fed its events in file order, possibly in batches; the
/// bytes it returns only make sense after the ones it returned before.
#[derive(Default)]
pub struct SnapshotEncoder {
    dict: FileDict,
    payload: Vec<u8>,
    defs: Vec<u8>,
    claims: Vec<u8>,
}

impl SnapshotEncoder {
    pub fn encode(&mut self, events: &[Event], out: &mut Vec<u8>) {
        for event in events {
            self.payload.clear();
            match event {
                Event::Created { lease } => {
                    self.defs.clear();
                    self.claims.clear();
                    let new = lease.claims.write_refs(&mut self.dict, &mut self.defs, &mut self.claims);
                    self.payload.push(DICT_LEASE);
                    put_varint(&mut self.payload, new);
                    self.payload.extend_from_slice(&self.defs);
                    binary::write_lease(lease, &mut self.payload);
                    self.payload.extend_from_slice(&self.claims);
                }
                other => json_payload(other, &mut self.payload),
            }
            push_record(out, &self.payload);
        }
    }
}

fn json_payload(event: &Event, payload: &mut Vec<u8>) {
    // Invariant: `Event` holds only strings, numbers and JSON values; serializing cannot fail.
    let _ = serde_json::to_writer(payload, event);
}

fn push_record(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&checksum(&len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// First byte of a self-contained binary `Created` payload (JSON payloads start with `{`).
const BINARY_LEASE: u8 = 0x01;
/// First byte of a `Created` payload that uses the file's dictionary.
const DICT_LEASE: u8 = 0x02;

fn decode_payload(payload: &[u8], memo: &mut ReplayMemo) -> Result<Event, String> {
    let lease = match payload.split_first() {
        Some((&BINARY_LEASE, mut rest)) => {
            let lease = binary::read_lease(&mut rest, memo)
                .and_then(|lease| Some((lease, ClaimSnapshot::read_from(&mut rest, memo)?)));
            (lease, rest)
        }
        Some((&DICT_LEASE, mut rest)) => {
            let defined = get_varint(&mut rest).and_then(|n| {
                let texts = (0..n).map(|_| get_str(&mut rest)).collect::<Option<Vec<&str>>>()?;
                memo.define(texts);
                Some(())
            });
            let lease = defined
                .and_then(|()| binary::read_lease(&mut rest, memo))
                .and_then(|lease| Some((lease, ClaimSnapshot::read_refs(&mut rest, memo)?)));
            (lease, rest)
        }
        _ => return serde_json::from_slice(payload).map_err(|e| e.to_string()),
    };
    match lease {
        (None, _) => Err("not a lease record".into()),
        (Some(_), rest) if !rest.is_empty() => Err("trailing bytes after a lease record".into()),
        (Some((mut lease, claims)), _) => {
            lease.claims = claims;
            Ok(Event::Created { lease: Box::new(lease) })
        }
    }
}

/// The binary lease record (module docs).
mod binary {
    use crate::ledger::codec::{get_i64, get_str, get_u8, get_varint, put_i64, put_str, put_varint};
    use crate::ledger::snapshot::ReplayMemo;
    use crate::ledger::{ClaimSnapshot, Lease, LeaseCredential, LeaseState};
    use crate::mint::Revocation;
    use std::sync::Arc;

    fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                put_str(out, s);
            }
        }
    }

    fn get_opt<'a>(input: &mut &'a [u8]) -> Option<Option<&'a str>> {
        match get_u8(input)? {
            0 => Some(None),
            1 => Some(Some(get_str(input)?)),
            _ => None,
        }
    }

    const STATES: [LeaseState; 5] =
        [LeaseState::Active, LeaseState::Revoking, LeaseState::Revoked, LeaseState::Expired, LeaseState::Irrevocable];
    const REVOCATIONS: [Revocation; 3] = [Revocation::Immediate, Revocation::DenyPolicy, Revocation::Expiry];

    /// Everything but the claims, which follow in one of two forms.
    pub(super) fn write_lease(l: &Lease, out: &mut Vec<u8>) {
        for s in [&l.id, &l.job, &l.policy, &l.issuer] {
            put_str(out, s);
        }
        put_i64(out, l.created_at);
        put_i64(out, l.expires_at);
        out.push(STATES.iter().position(|s| *s == l.state).unwrap_or(0) as u8);
        put_opt(out, l.reason.as_deref());
        put_varint(out, u64::from(l.attempts));
        put_i64(out, l.next_attempt_at);
        put_opt(out, l.last_error.as_deref());
        put_varint(out, l.credentials.len() as u64);
        for c in &l.credentials {
            put_str(out, &c.name);
            put_str(out, &c.kind);
            out.push(REVOCATIONS.iter().position(|r| *r == c.revocation).unwrap_or(0) as u8);
            put_str(out, &c.backend);
            put_str(out, &c.data);
        }
    }

    pub(super) fn read_lease(input: &mut &[u8], memo: &mut ReplayMemo) -> Option<Lease> {
        let id: Arc<str> = get_str(input)?.into();
        let job: Arc<str> = get_str(input)?.into();
        let policy = memo.name(get_str(input)?);
        let issuer = memo.name(get_str(input)?);
        let created_at = get_i64(input)?;
        let expires_at = get_i64(input)?;
        let state = *STATES.get(usize::from(get_u8(input)?))?;
        let reason = get_opt(input)?.map(|r| memo.name(r));
        let attempts = u32::try_from(get_varint(input)?).ok()?;
        let next_attempt_at = get_i64(input)?;
        let last_error = get_opt(input)?.map(Into::into);
        let n = usize::try_from(get_varint(input)?).ok()?;
        // Bounded by the bytes left: a corrupt count cannot make us allocate a huge vector.
        let mut credentials = Vec::with_capacity(n.min(input.len()));
        for _ in 0..n {
            let name = memo.name(get_str(input)?);
            let kind = memo.name(get_str(input)?);
            let revocation = *REVOCATIONS.get(usize::from(get_u8(input)?))?;
            let backend = memo.name(get_str(input)?);
            let data: Box<str> = get_str(input)?.into();
            credentials.push(LeaseCredential { name, kind, revocation, backend, data });
        }
        Some(Lease {
            id,
            job,
            policy,
            issuer,
            created_at,
            expires_at,
            state,
            reason,
            attempts,
            next_attempt_at,
            last_error,
            credentials: credentials.into_boxed_slice(),
            claims: ClaimSnapshot::default(), // read next, by the caller (two forms)
        })
    }
}

/// CRC32 over the length field and the payload, so a damaged length is caught too.
fn checksum(len: &[u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Decodes a whole journal file. Returns the events and the length of the good prefix; a torn
/// tail is everything after it. Corruption before the tail is an error.
pub fn decode(bytes: &[u8]) -> Result<(Vec<Event>, u64), String> {
    let mut events = Vec::new();
    let good = decode_with(bytes, |e| events.push(e))?;
    Ok((events, good))
}

/// How many records the file seems to hold (lengths only, no checks): for sizing the ledger
/// before a replay, so its maps do not grow a million entries by doubling.
pub fn count_records(bytes: &[u8]) -> usize {
    let mut at = MAGIC.len();
    let mut n = 0;
    while let Some(header) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len == 0 || len > MAX_RECORD_BYTES {
            break;
        }
        at += 8 + len;
        n += 1;
    }
    n
}

/// [`decode`], handing each event to `sink` as it is read (replay applies a million leases: no
/// vector of them all). On an error, events before the corrupt record have been handed out.
pub fn decode_with(bytes: &[u8], mut sink: impl FnMut(Event)) -> Result<u64, String> {
    if bytes.len() < MAGIC.len() {
        // A crash while writing the magic of a brand-new journal: nothing was recorded yet.
        return if MAGIC.starts_with(bytes) { Ok(0) } else { Err("not an ephemera journal".into()) };
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err("not an ephemera journal (bad magic)".into());
    }
    let mut memo = ReplayMemo::default();
    let mut at = MAGIC.len();
    while at < bytes.len() {
        let rest = &bytes[at..];
        // After a crash the file system may show unsynced appended blocks as zeros.
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let Some(header) = rest.get(..8) else { break }; // torn: header cut short
        let len_bytes = [header[0], header[1], header[2], header[3]];
        let len = u32::from_le_bytes(len_bytes) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_RECORD_BYTES {
            return Err(format!("corrupt record at byte {at}: impossible length {len}"));
        }
        let Some(payload) = rest.get(8..8 + len) else { break }; // torn: runs past the end
        let after = rest.len() - 8 - len;
        if checksum(&len_bytes, payload) != crc {
            if after == 0 {
                break; // torn: the last record's bytes did not all reach the disk
            }
            return Err(format!("corrupt record at byte {at}: checksum mismatch, with {after} bytes after it"));
        }
        let event = decode_payload(payload, &mut memo).map_err(|e| format!("unreadable record at byte {at}: {e}"))?;
        sink(event);
        at += 8 + len;
    }
    Ok(at as u64)
}

/// Where the writer answers a command.
type Done = oneshot::Sender<Result<(), JournalError>>;

enum Command {
    Append {
        bytes: Vec<u8>,
        done: Done,
    },
    /// A snapshot, already encoded (without the magic).
    Compact {
        snapshot: Vec<u8>,
        done: Done,
    },
    /// From the thread that wrote a compaction's file: done, or why not.
    Written {
        replacement: std::io::Result<Box<dyn Replacement>>,
    },
}

/// The handle appenders use. Cloning shares the one writer thread.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
}

#[derive(Default)]
pub struct Stats {
    /// Bytes written since the last compaction (or start).
    pub bytes_since_compaction: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Set after a write that could not be undone: every later append fails until a restart.
    pub broken: AtomicBool,
}

impl Journal {
    /// Starts the writer thread over `storage`, whose file currently holds `len` bytes. It ends
    /// when the last `Journal` handle is dropped, after answering everything queued.
    pub fn start(storage: Box<dyn Storage>, len: u64) -> Journal {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let stats = Arc::new(Stats::default());
        stats.bytes_since_compaction.store(len, Ordering::Relaxed);
        let writer_stats = stats.clone();
        let weak = tx.downgrade();
        // A thread of its own, not a tokio task: every batch is a blocking write and fdatasync,
        // and handing each to the blocking pool and back cost two thread wake-ups per batch.
        let spawned = std::thread::Builder::new()
            .name("ephemera-journal".into())
            .spawn(move || writer(storage, len, rx, weak, &writer_stats));
        if let Err(e) = spawned {
            // Every append then fails with "the journal writer stopped": nothing is issued.
            tracing::error!(error = %e, "cannot start the journal writer thread");
            stats.broken.store(true, Ordering::Release);
        }
        Journal { tx, stats }
    }

    /// Appends events; returns once they are on disk (fsync), or why they are not.
    pub async fn append(&self, events: &[Event]) -> Result<(), JournalError> {
        let mut bytes = Vec::new();
        encode(events, &mut bytes);
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Append { bytes, done })
            .await
            .map_err(|_| JournalError("the journal writer stopped".into()))?;
        wait.await.map_err(|_| JournalError("the journal writer stopped".into()))?
    }

    /// Replaces the journal with `snapshot` (every lease still remembered, in its current state)
    /// followed by every record appended since the last compaction, which the snapshot may not
    /// reflect yet (see [`writer`]). The snapshot is encoded on a blocking thread first, so the
    /// writer (and every append behind it) waits only for the file to be written.
    pub async fn compact(&self, snapshot: Vec<Event>) -> Result<(), JournalError> {
        let encoded = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            SnapshotEncoder::default().encode(&snapshot, &mut bytes);
            bytes
        });
        let snapshot = encoded.await.map_err(|e| JournalError(format!("journal compaction panicked: {e}")))?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Compact { snapshot, done })
            .await
            .map_err(|_| JournalError("the journal writer stopped".into()))?;
        wait.await.map_err(|_| JournalError("the journal writer stopped".into()))?
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Waits until everything queued so far is durable (used at shutdown).
    pub async fn flush(&self) -> Result<(), JournalError> {
        self.append(&[]).await
    }
}

/// The single writer: takes every queued append, writes them, one fsync, answers all.
///
/// **Compaction carries the records since the last one over.** The snapshot comes from memory,
/// taken by the reaper before its command reaches this thread, and memory trails the journal:
/// a lease is put in memory only once its `Created` record is durable, and records appended
/// between the snapshot and the command are written here first. Replacing the file with the
/// snapshot alone would drop such a lease from the journal: after a restart its credentials
/// would never be revoked. So the new file is the snapshot followed by every record written
/// since the previous compaction (or the start, whose replay memory fully reflects); replaying
/// a record whose effect the snapshot already holds is harmless (`Ledger::apply` is
/// idempotent, and a lease's records replay in their order). The file is therefore at most a
/// snapshot plus two compaction intervals long.
///
/// **Appends never wait for a compaction.** Its file (a snapshot of a million leases is
/// hundreds of MB) is written and synced by a thread of its own while appends go on to the
/// old journal. Once it is done, this thread copies over what was appended meanwhile, syncs,
/// and renames it into place: the only pause appends see.
fn writer(
    mut storage: Box<dyn Storage>,
    mut len: u64,
    mut rx: mpsc::Receiver<Command>,
    tx: WeakSender<Command>,
    stats: &Stats,
) {
    let mut batch = Vec::new();
    // Where the records not yet carried over by a compaction begin.
    let mut since_compaction = len;
    // The compaction being written: where the journal stood when it started, its file's length
    // so far, and who waits for it.
    let mut compacting: Option<((u64, u64), Done)> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut appends = Vec::new();
        let mut other = None;
        match first {
            Command::Append { bytes, done } => appends.push((bytes, done)),
            command => other = Some(command),
        }
        while other.is_none() && appends.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Command::Append { bytes, done }) => appends.push((bytes, done)),
                Ok(command) => other = Some(command),
                Err(_) => break,
            }
        }
        if !appends.is_empty() {
            batch.clear();
            appends.iter().for_each(|(bytes, _)| batch.extend_from_slice(bytes));
            let result = write_batch(&mut *storage, &mut len, &batch, stats);
            for (_, done) in appends {
                let _ = done.send(result.clone());
            }
        }
        match other {
            None | Some(Command::Append { .. }) => {}
            Some(Command::Compact { done, .. }) if compacting.is_some() => {
                let _ = done.send(Err(JournalError("a compaction is already running".into())));
            }
            Some(Command::Compact { snapshot, done }) => {
                match start_compaction(&mut *storage, since_compaction, len, snapshot, &tx, stats) {
                    Ok(prefix) => compacting = Some(((len, prefix), done)),
                    Err(e) => drop(done.send(Err(e))),
                }
            }
            Some(Command::Written { replacement }) => {
                let Some((at, done)) = compacting.take() else { continue };
                let result = replacement
                    .map_err(|e| JournalError(format!("journal compaction failed: {e}")))
                    .and_then(|replacement| finish_compaction(&mut *storage, &mut len, at, replacement, stats));
                if let Ok(carried_from) = result {
                    since_compaction = carried_from;
                }
                let _ = done.send(result.map(|_| ()));
            }
        }
    }
}

/// Starts writing a compaction's file on a thread of its own: the magic, the snapshot, and the
/// records appended since the previous compaction (`since..len`). It reports back with
/// [`Command::Written`]. Returns the length that file will have.
fn start_compaction(
    storage: &mut dyn Storage,
    since: u64,
    len: u64,
    snapshot: Vec<u8>,
    tx: &WeakSender<Command>,
    stats: &Stats,
) -> Result<u64, JournalError> {
    let failed = |e: std::io::Error| JournalError(format!("journal compaction failed: {e}"));
    if stats.broken.load(Ordering::Acquire) {
        return Err(JournalError("the journal is broken after an earlier write failure; not compacting".into()));
    }
    let carried = storage.read_range(since, len).map_err(failed)?;
    let mut replacement = storage.start_replacement().map_err(failed)?;
    let tx = tx.upgrade().ok_or_else(|| JournalError("the journal is shutting down".into()))?;
    let prefix = (MAGIC.len() + snapshot.len() + carried.len()) as u64;
    std::thread::Builder::new()
        .name("ephemera-compact".into())
        .spawn(move || {
            let written = [MAGIC.as_slice(), &snapshot, &carried]
                .into_iter()
                .try_for_each(|bytes| replacement.write(bytes))
                .and_then(|()| replacement.sync())
                .map(|()| replacement);
            let _ = tx.blocking_send(Command::Written { replacement: written });
        })
        .map(|_| prefix)
        .map_err(failed)
}

/// Finishes a compaction whose file is written (`prefix` bytes so far): copies over the records
/// appended since it started (`mark..len`), syncs, and puts it in place of the journal. Returns
/// where those records begin in the new file: they are what the next compaction carries over.
fn finish_compaction(
    storage: &mut dyn Storage,
    len: &mut u64,
    (mark, prefix): (u64, u64),
    mut replacement: Box<dyn Replacement>,
    stats: &Stats,
) -> Result<u64, JournalError> {
    let failed = |e: std::io::Error| JournalError(format!("journal compaction failed: {e}"));
    if stats.broken.load(Ordering::Acquire) {
        return Err(JournalError("the journal is broken after an earlier write failure; not compacting".into()));
    }
    let appended = storage.read_range(mark, *len).map_err(failed)?;
    replacement.write(&appended).and_then(|()| replacement.sync()).map_err(failed)?;
    storage.install(replacement).map_err(|e| {
        // Renamed but not reopened, or worse: appends cannot be trusted to reach the journal.
        stats.broken.store(true, Ordering::Release);
        failed(e)
    })?;
    *len = prefix + appended.len() as u64;
    stats.bytes_since_compaction.store(appended.len() as u64, Ordering::Relaxed);
    Ok(prefix)
}

fn write_batch(storage: &mut dyn Storage, len: &mut u64, batch: &[u8], stats: &Stats) -> Result<(), JournalError> {
    if stats.broken.load(Ordering::Acquire) {
        return Err(JournalError("the journal is broken after an earlier write failure; restart the broker".into()));
    }
    match storage.append(batch).and_then(|()| storage.sync()) {
        Ok(()) => {
            *len += batch.len() as u64;
            stats.bytes_since_compaction.fetch_add(batch.len() as u64, Ordering::Relaxed);
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            // Cut off whatever part of the batch got written, so the next append does not land
            // after garbage (which the next start would call corruption).
            if storage.truncate(*len).and_then(|()| storage.sync()).is_err() {
                stats.broken.store(true, Ordering::Release);
            }
            Err(JournalError(format!("journal write failed: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(n: usize) -> Vec<Event> {
        (0..n).map(|i| Event::Revoked { id: format!("lse_{i}"), at: i as i64 }).collect()
    }

    fn file_with(events: &[Event]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        encode(events, &mut bytes);
        bytes
    }

    fn lease(i: usize) -> Event {
        let claims = serde_json::json!({
            "repository": "octo-org/octo-repo", "repository_id": "74", "jti": format!("jti-{i}"),
            "iat": 1632493567, "aud": ["a", "b"], "ref_protected": "true", "none": null,
        });
        let lease = serde_json::json!({
            "id": format!("lse_{i}"), "job": format!("github:74:{i}:1:{i}"), "policy": "deploy", "issuer": "github",
            "created_at": 10, "expires_at": -5, "state": "revoking", "reason": "policy-changed", "attempts": 3,
            "next_attempt_at": 99, "last_error": "backend jwt: boom",
            "credentials": [
                {"name": "api", "kind": "jwt", "revocation": "immediate", "handle": {"backend": "jwt", "data": {"jti": "jti_x"}}},
                {"name": "aws", "kind": "aws", "revocation": "deny-policy", "handle": {"backend": "aws-prod", "data": {"role": "r", "n": 5}}},
            ],
            "claims": claims,
        });
        serde_json::from_value(serde_json::json!({"t": "created", "lease": lease})).unwrap()
    }

    #[test]
    fn leases_round_trip_through_the_binary_record() {
        let all = vec![lease(1), events(1).remove(0), lease(2)];
        let bytes = file_with(&all);
        assert_eq!(bytes[MAGIC.len() + 8], BINARY_LEASE, "a lease is written in binary");
        let (decoded, good) = decode(&bytes).unwrap();
        assert_eq!(decoded, all);
        assert_eq!(good, bytes.len() as u64);
    }

    #[test]
    fn a_journal_with_json_lease_records_still_replays() {
        // The record format before binary leases: every payload JSON.
        let mut bytes = MAGIC.to_vec();
        for event in [lease(7), events(1).remove(0)] {
            let payload = serde_json::to_vec(&event).unwrap();
            let len = (payload.len() as u32).to_le_bytes();
            bytes.extend_from_slice(&len);
            bytes.extend_from_slice(&checksum(&len, &payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
        }
        let (decoded, _) = decode(&bytes).unwrap();
        assert_eq!(decoded, vec![lease(7), events(1).remove(0)]);
    }

    /// The payloads of the records in `bytes` (no magic).
    fn payloads(mut bytes: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        while bytes.len() >= 8 {
            let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            out.push(&bytes[8..8 + len]);
            bytes = &bytes[8 + len..];
        }
        out
    }

    #[test]
    fn a_damaged_binary_lease_is_an_error_not_a_misread_lease() {
        let mut self_contained = Vec::new();
        encode(&[lease(3)], &mut self_contained);
        let mut compacted = Vec::new();
        SnapshotEncoder::default().encode(&[lease(3)], &mut compacted);
        for (form, bytes) in [(BINARY_LEASE, self_contained), (DICT_LEASE, compacted)] {
            let mut payload = payloads(&bytes)[0].to_vec();
            assert_eq!(payload[0], form);
            assert_eq!(decode_payload(&payload, &mut ReplayMemo::default()).unwrap(), lease(3));
            for cut in 1..payload.len() {
                assert!(decode_payload(&payload[..cut], &mut ReplayMemo::default()).is_err(), "{form}: cut at {cut}");
            }
            payload.push(0);
            assert!(decode_payload(&payload, &mut ReplayMemo::default()).is_err(), "{form}: trailing bytes");
        }
    }

    #[test]
    fn a_compacted_journal_replays_the_same_leases_and_writes_each_shared_string_once() {
        let all: Vec<Event> = (0..200).map(lease).chain(events(2)).collect();
        let mut compacted = MAGIC.to_vec();
        let mut encoder = SnapshotEncoder::default();
        // In batches, as the bench writes it: the dictionary carries over between them.
        encoder.encode(&all[..70], &mut compacted);
        encoder.encode(&all[70..], &mut compacted);
        assert_eq!(compacted[MAGIC.len() + 8], DICT_LEASE);
        let (decoded, good) = decode(&compacted).unwrap();
        assert_eq!(decoded, all);
        assert_eq!(good, compacted.len() as u64);

        let occurrences = |bytes: &[u8], text: &[u8]| bytes.windows(text.len()).filter(|w| *w == text).count();
        assert_eq!(occurrences(&compacted, b"octo-org/octo-repo"), 1, "a shared value is defined once");
        assert_eq!(occurrences(&compacted, b"ref_protected"), 1, "a claim name is defined once");
        let self_contained = file_with(&all);
        assert_eq!(occurrences(&self_contained, b"octo-org/octo-repo"), 200);
        assert!(
            compacted.len() * 10 < self_contained.len() * 8,
            "{} bytes compacted vs {} self-contained",
            compacted.len(),
            self_contained.len()
        );

        // Appends after a compaction are self-contained records; both kinds replay together.
        let mut appended = compacted.clone();
        encode(&[lease(500)], &mut appended);
        let (decoded, _) = decode(&appended).unwrap();
        assert_eq!(decoded.last(), Some(&lease(500)));
    }

    #[test]
    fn a_compacted_record_that_uses_a_string_the_file_never_defined_is_corrupt() {
        // The second lease's record refers to strings the first one defined. Without the first
        // (a file spliced together, or a bug), the ids point nowhere: refused, never misread.
        let mut bytes = Vec::new();
        SnapshotEncoder::default().encode(&[lease(1), lease(2)], &mut bytes);
        let second = payloads(&bytes)[1];
        assert_eq!(second[..2], [DICT_LEASE, 0], "the second record defines nothing new");
        let err = decode_payload(second, &mut ReplayMemo::default()).unwrap_err();
        assert_eq!(err, "not a lease record");

        let mut file = MAGIC.to_vec();
        push_record(&mut file, second);
        push_record(&mut file, second);
        let err = decode(&file).unwrap_err();
        assert!(err.starts_with("unreadable record at byte 8"), "{err}");
    }

    #[test]
    fn records_round_trip() {
        let bytes = file_with(&events(3));
        let (decoded, good) = decode(&bytes).unwrap();
        assert_eq!(decoded, events(3));
        assert_eq!(good, bytes.len() as u64);
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_possible_length() {
        let whole = file_with(&events(3));
        let two = file_with(&events(2)).len();
        for cut in two..whole.len() {
            let (decoded, good) = decode(&whole[..cut]).unwrap();
            assert_eq!(decoded, events(2), "cut at {cut}");
            assert_eq!(good, two as u64, "cut at {cut}");
        }
    }

    #[test]
    fn a_last_record_with_bad_bytes_is_a_torn_tail() {
        let mut bytes = file_with(&events(3));
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(decode(&bytes).unwrap().0, events(2));
    }

    #[test]
    fn a_corrupt_middle_record_stops_with_its_offset() {
        let mut bytes = file_with(&events(3));
        bytes[MAGIC.len() + 10] ^= 0xff; // inside the first payload
        let err = decode(&bytes).unwrap_err();
        assert!(err.contains("corrupt record at byte 8"), "{err}");
    }

    #[test]
    fn a_zero_filled_tail_after_a_crash_is_torn_not_corrupt() {
        let mut bytes = file_with(&events(2));
        bytes.extend_from_slice(&[0u8; 4096]);
        assert_eq!(decode(&bytes).unwrap().0, events(2));
    }

    #[test]
    fn a_damaged_length_field_mid_file_is_corruption() {
        let mut bytes = file_with(&events(3));
        bytes[MAGIC.len()] ^= 0x01; // length of the first record, off by one
        assert!(decode(&bytes).unwrap_err().contains("corrupt record at byte 8"));
    }

    #[test]
    fn another_file_is_not_a_journal() {
        assert!(decode(b"{\"some\": \"json\"}").is_err());
    }

    #[test]
    fn open_truncates_a_torn_tail_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut bytes = file_with(&events(2));
        bytes.extend_from_slice(&[7, 0, 0]);
        std::fs::write(&path, &bytes).unwrap();
        let (_, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!(replayed.events, events(2));
        assert_eq!(replayed.truncated, 3);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes.len() as u64 - 3);
    }

    #[test]
    fn a_crash_while_writing_the_magic_leaves_a_journal_that_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        std::fs::write(&path, &MAGIC[..3]).unwrap();
        let (mut storage, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!((replayed.events.len(), replayed.len), (0, MAGIC.len() as u64));
        let mut record = Vec::new();
        encode(&events(1), &mut record);
        storage.append(&record).unwrap();
        drop(storage);
        let (_, again) = FileStorage::open(&path).unwrap();
        assert_eq!(again.events, events(1), "the next start must read what was appended");
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs_and_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (storage, _) = FileStorage::open(&path).unwrap();
        let journal = Journal::start(Box::new(storage), MAGIC.len() as u64);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let j = journal.clone();
                tokio::spawn(async move { j.append(&[Event::Revoked { id: format!("lse_{i}"), at: 0 }]).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let fsyncs = journal.stats().fsyncs.load(Ordering::Relaxed);
        assert!(fsyncs < 200, "no group commit: {fsyncs} fsyncs for 200 appends");
        let (events, _) = decode(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(events.len(), 200);
    }

    #[tokio::test]
    async fn compaction_replaces_the_file_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (storage, _) = FileStorage::open(&path).unwrap();
        let journal = Journal::start(Box::new(storage), MAGIC.len() as u64);
        journal.append(&events(5)).await.unwrap();
        journal.compact(events(1)).await.unwrap();
        journal.append(&[Event::Revoked { id: "after".into(), at: 9 }]).await.unwrap();
        let (decoded, _) = decode(&std::fs::read(&path).unwrap()).unwrap();
        // The snapshot, then what was appended since the start (carried over), then the rest.
        let mut expected = events(1);
        expected.extend(events(5));
        expected.push(Event::Revoked { id: "after".into(), at: 9 });
        assert_eq!(decoded, expected);
        // The next compaction carries over only what came after this one.
        journal.compact(events(1)).await.unwrap();
        let (decoded, _) = decode(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(decoded, vec![events(1)[0].clone(), Event::Revoked { id: "after".into(), at: 9 }]);
    }

    /// Journal storage whose compaction file blocks in `sync` until the test opens the gate: a
    /// fake, to hold a compaction mid-write (a real disk is never that slow on cue).
    struct Gated {
        inner: FileStorage,
        entered: std::sync::mpsc::Sender<()>,
        gate: Arc<std::sync::Barrier>,
    }

    struct GatedReplacement {
        inner: Box<dyn Replacement>,
        entered: std::sync::mpsc::Sender<()>,
        gate: Arc<std::sync::Barrier>,
    }

    impl Storage for Gated {
        fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.inner.append(bytes)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            self.inner.sync()
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.inner.truncate(len)
        }
        fn read_range(&mut self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
            self.inner.read_range(from, to)
        }
        fn start_replacement(&mut self) -> std::io::Result<Box<dyn Replacement>> {
            let inner = self.inner.start_replacement()?;
            Ok(Box::new(GatedReplacement { inner, entered: self.entered.clone(), gate: self.gate.clone() }))
        }
        fn install(&mut self, replacement: Box<dyn Replacement>) -> std::io::Result<()> {
            self.inner.install(replacement)
        }
    }

    impl Replacement for GatedReplacement {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.inner.write(bytes)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            // Only the compaction thread's sync waits; the writer's final sync goes through.
            if std::thread::current().name() == Some("ephemera-compact") {
                let _ = self.entered.send(());
                self.gate.wait();
            }
            self.inner.sync()
        }
    }

    #[tokio::test]
    async fn appends_go_on_while_a_compaction_is_written_and_land_in_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (inner, opened) = FileStorage::open(&path).unwrap();
        let (entered, in_sync) = std::sync::mpsc::channel();
        let gate = Arc::new(std::sync::Barrier::new(2));
        let journal = Journal::start(Box::new(Gated { inner, entered, gate: gate.clone() }), opened.len);
        journal.append(&[lease(1)]).await.unwrap();
        let compaction = tokio::spawn({
            let journal = journal.clone();
            async move { journal.compact(vec![lease(1)]).await }
        });
        tokio::task::spawn_blocking(move || in_sync.recv().unwrap()).await.unwrap();
        // The compaction's file is being written (held in its sync): appends still complete.
        journal.append(&[lease(2)]).await.unwrap();
        journal.append(&[lease(3)]).await.unwrap();
        assert!(!compaction.is_finished());
        tokio::task::spawn_blocking(move || gate.wait()).await.unwrap();
        compaction.await.unwrap().unwrap();
        journal.append(&[lease(4)]).await.unwrap();
        drop(journal);

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[MAGIC.len() + 8], DICT_LEASE, "the journal is the compacted file");
        let (decoded, _) = decode(&bytes).unwrap();
        // The snapshot, the carried-over record of lease 1, the two appended during the
        // compaction (copied over at the end), and the one after it.
        assert_eq!(decoded, vec![lease(1), lease(1), lease(2), lease(3), lease(4)]);
        assert!(!path.with_extension("compact").exists());
    }

    #[tokio::test]
    async fn a_lease_made_durable_after_the_snapshot_was_taken_survives_compaction() {
        // The reaper's snapshot comes from memory, and memory learns of a lease only after its
        // record is durable. A lease recorded between the snapshot and the compaction is in
        // neither the snapshot nor, if compaction just replaced the file, the journal.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (storage, opened) = FileStorage::open(&path).unwrap();
        let journal = Journal::start(Box::new(storage), opened.len);
        journal.append(&[lease(1)]).await.unwrap();
        let snapshot = vec![lease(1)]; // what memory held when the reaper looked
        journal.append(&[lease(2)]).await.unwrap(); // durable (201 sent), not in the snapshot
        journal.compact(snapshot).await.unwrap();
        journal.append(&[lease(3)]).await.unwrap();
        drop(journal);
        let (_, replayed) = FileStorage::open(&path).unwrap();
        let ledger = crate::ledger::Ledger::default();
        replayed.events.into_iter().for_each(|e| ledger.apply(e));
        for i in 1..=3 {
            assert!(ledger.state(&format!("lse_{i}")).is_some(), "lease {i} was lost by compaction");
        }
        assert_eq!(ledger.len(), 3);
    }
}
