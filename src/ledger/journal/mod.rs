//! The lease journal: an append-only file of length-prefixed, checksummed records.
//!
//! ```text
//! file    = MAGIC record*
//! record  = len:u32 LE | crc32(len ‖ payload):u32 LE | payload
//! payload = 0x01 lease claims            — `Event::Created`, as appended by an exchange
//!         | 0x02 n:varint str*n lease refs — `Event::Created`, as written by compaction
//!         | 0x03 lease renewal claims    — as 0x01, for a renewable lease
//!         | 0x04 n:varint str*n lease renewal refs — as 0x02, for a renewable lease
//!         | JSON of one `Event`            — every other event (starts with `{`)
//! lease   = id job policy issuer (str) | created expires (zigzag varint) | state:u8
//!         | reason (0 | 1 str) | attempts (varint) | next_attempt (zigzag varint)
//!         | last_error (0 | 1 str) | n:varint credential*n
//! claims  = the claims, every string written out (ClaimSnapshot::write_to)
//! refs    = the claims, names and shared values as ids into the file's dictionary
//!           (ClaimSnapshot::write_refs)
//! credential = name kind (str) | revocation:u8 | backend data (str)
//! renewal = token_sha256 (str) | count (varint) | last_at (zigzag varint)
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
//! **The room.** The file runs on past its last record in zeros, up to a MiB: appends land in
//! blocks already written, so their `fdatasync` writes only the data, not the inode too (the
//! file's size changes once a MiB; `file::ROOM_STEP` has the measurement). Replay stops at the
//! zeros, and a start keeps them.
//!
//! A crash can leave a torn tail (a record cut short, or whose bytes never reached the disk,
//! zeros of the room possibly after it): it is truncated at start, room and all. A bad record
//! *before* the tail is corruption, not a crash: the start stops with the byte offset, because
//! silently dropping it could forget a lease that still needs revoking.
//!
//! **Group commit.** One writer thread appends: it takes every queued append, writes them, one
//! `fsync`, and answers all; concurrent callers share that `fsync` and each learns whether its
//! records are durable.
//!
//! **Compaction carries the records since the last one over.** The snapshot comes from memory,
//! taken by the reaper before its command reaches the writer thread, and memory trails the
//! journal: a lease is put in memory only once its `Created` record is durable, and records
//! appended between the snapshot and the command are written first. Replacing the file with the
//! snapshot alone would drop such a lease from the journal: after a restart its credentials
//! would never be revoked. So the new file is the snapshot followed by every record written
//! since the previous compaction (or the start, whose replay memory fully reflects); replaying
//! a record whose effect the snapshot already holds is harmless (`FileStore::apply` is
//! idempotent, and a lease's records replay in their order). The file is therefore at most a
//! snapshot plus two compaction intervals long.
//!
//! **Appends never wait for a compaction.** Its file (a snapshot of a million leases is
//! hundreds of MB) is written and synced by a thread of its own while appends go on to the
//! old journal. Once it is done, the writer thread copies over what was appended meanwhile,
//! syncs, and renames it into place: the only pause appends see.
//!
//! The pieces: `format` (the records: encoding, decoding, the dictionary), `file` (the
//! [`Storage`] the bytes go to, and opening a journal file: replay, torn-tail truncation) and
//! `writer` (the writer thread: group commit, compaction). This module is the handle over them.

mod file;
mod format;
mod writer;

pub use file::{FileStorage, JournalReader, Replacement, Storage};
pub use format::{SnapshotEncoder, count_records, decode, decode_with, encode};
pub use writer::Compacted;

use super::Event;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
use writer::{Command, MAX_BATCH};

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
    /// The end of the last good record: where the next append lands, and what a failed append
    /// is cut back to. The file may run on in zeros (the room, module docs).
    pub len: u64,
}

/// The handle appenders use. Cloning shares the one writer thread.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
}

/// A compaction's snapshot: called once, on the compaction's own thread, with a sink that takes
/// the encoded records (without the magic) piece by piece; returns how many records it wrote.
pub type SnapshotSource =
    Box<dyn FnOnce(&mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<usize> + Send>;

#[derive(Default)]
pub struct Stats {
    /// Bytes the next compaction would carry over: written since the last compaction began (or
    /// since the start).
    pub bytes_since_compaction: AtomicU64,
    /// The magic and snapshot of the last compaction (0 before the first): what the next one
    /// will write again, roughly, and so what the appends between two are measured against.
    pub snapshot_bytes: AtomicU64,
    /// The journal's durable length: a compaction's thread copies appends up to here.
    pub len: AtomicU64,
    /// Bytes appended since the start (a compaction's rewrites not counted).
    pub appended_bytes: AtomicU64,
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
        stats.len.store(len, Ordering::Release);
        let writer_stats = stats.clone();
        let weak = tx.downgrade();
        // A thread of its own, not a tokio task: every batch is a blocking write and fdatasync,
        // and handing each to the blocking pool and back cost two thread wake-ups per batch.
        let spawned = std::thread::Builder::new()
            .name("ephemera-journal".into())
            .spawn(move || writer::writer(storage, len, rx, weak, writer_stats));
        if let Err(e) = spawned {
            // Every append then fails with "the journal writer stopped": nothing is issued.
            tracing::error!(error = %e, "cannot start the journal writer thread");
            stats.broken.store(true, Ordering::Release);
        }
        Journal { tx, stats }
    }

    /// Appends events; returns once they are on disk (fsync), or why they are not.
    pub async fn append(&self, events: &[Event]) -> Result<(), JournalError> {
        // An exchange's `Created` record is ~1.1 KB: grown from empty, the buffer was
        // reallocated and copied eight times on the way (a profile's `put_str` → `realloc`).
        let mut bytes = Vec::with_capacity(1024 * events.len());
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
    /// reflect yet (module docs). Tests and tools; the store streams its snapshot with
    /// [`Journal::compact_from`].
    pub async fn compact(&self, snapshot: Vec<Event>) -> Result<Compacted, JournalError> {
        self.compact_from(
            Box::new(move |sink| {
                let mut bytes = Vec::new();
                SnapshotEncoder::default().encode(&snapshot, &mut bytes);
                sink(&bytes).map(|()| snapshot.len())
            }),
            None,
        )
        .await
    }

    /// [`Journal::compact`] with a snapshot written by `source`, on the compaction's own thread,
    /// while appends go on (module docs). `since`: the journal offset from which records are
    /// carried over, when the caller knows the snapshot holds everything before it (the store
    /// does: `FileStore`'s `Appends`); `None` carries over everything since the last compaction.
    pub async fn compact_from(&self, source: SnapshotSource, since: Option<u64>) -> Result<Compacted, JournalError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Compact { source, since, done })
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
