//! Where the journal's bytes go: the [`Storage`] the writer appends to, and the real one,
//! [`FileStorage`], which also opens a journal file (replay, torn-tail truncation).

use super::format::{MAGIC, count_records, decode_with};
use super::{JournalError, Replayed};
use crate::ledger::Event;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Events per batch handed from the replay's decoder thread to its applier.
const REPLAY_BATCH: usize = 1024;

/// Where the journal's bytes go. [`FileStorage`] is the real one; tests wrap it to inject write
/// failures a real disk produces only rarely (ENOSPC, EIO).
pub trait Storage: Send + 'static {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    /// Cuts the file back to `len` bytes (after a failed append left partial bytes).
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    /// The file's bytes in `from..to` (compaction carries the records since the last one over).
    fn read_range(&mut self, from: u64, to: u64) -> std::io::Result<Vec<u8>>;
    /// A second handle on the journal for a compaction's thread, which copies records from it
    /// while appends go on. It reads only bytes already durable, which no append changes.
    fn reader(&mut self) -> std::io::Result<Box<dyn JournalReader>>;
    /// Starts the file a compaction writes, next to the journal. It is written and synced on a
    /// thread of its own while appends go on to the journal.
    fn start_replacement(&mut self) -> std::io::Result<Box<dyn Replacement>>;
    /// Makes a written and synced replacement the journal: atomically (rename) and durably (the
    /// directory synced); appends then go to it.
    fn install(&mut self, replacement: Box<dyn Replacement>) -> std::io::Result<()>;
}

/// Reads a journal's bytes at an offset ([`Storage::reader`]).
pub trait JournalReader: Send + 'static {
    fn read_at(&self, from: u64, to: u64) -> std::io::Result<Vec<u8>>;
}

impl JournalReader for File {
    fn read_at(&self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        let len = usize::try_from(to.saturating_sub(from)).map_err(std::io::Error::other)?;
        let mut bytes = vec![0; len];
        self.read_exact_at(&mut bytes, from)?;
        Ok(bytes)
    }
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

/// How far ahead of its records the journal file is grown, in zeros: the room appends land in.
///
/// An append that grows a file changes its size, and then its `fdatasync` must write the inode
/// too, synchronously, on top of the data: measured on this machine kind's ext4 (no journal) that
/// was 11.4 % of a saturated broker's CPU, more than the data pages' 7.2 %. An append that lands
/// in blocks already written changes no metadata its `fdatasync` must keep, so it writes only the
/// data. PostgreSQL fills its WAL segments with zeros before use for the same reason
/// (`wal_init_zero`). `fallocate` would not do: its blocks are "unwritten", and the first write
/// into each converts it, a metadata change again (and a journalled one on ext4 with a journal
/// or XFS). The zeros are written right after the records of the append that needs them and
/// made durable by its `fdatasync`: one larger sync per step (~700 exchanges), none in between
/// (and none for a batch large enough to pay for its own inode write, [`LARGE_BATCH`]).
///
/// Replay stops at a zero tail (`decode_with`), and a start keeps it as room ([`FileStorage::open`]).
/// A side effect users see: a disk that fills up still takes up to this many bytes of records
/// before appends fail, since the blocks are the journal's already.
pub(crate) const ROOM_STEP: u64 = 1024 * 1024;

/// A batch at least this large grows no room when it runs out: it pays for its own inode write
/// well enough, and the zeros are not free. Every byte of room is written twice (as a zero, then
/// as a record), which at the rate of large batches is the disk's bandwidth: 256 concurrent
/// writers made ~160k leases/s durable with room grown on every batch against ~220k/s without
/// (bench row 3e). The next small batch grows it again.
const LARGE_BATCH: usize = 64 * 1024;

pub struct FileStorage {
    path: PathBuf,
    file: File,
    /// Where the next append lands: the end of the last record.
    end: u64,
    /// The file's length: the records, then zeros up to here ([`ROOM_STEP`]).
    room: u64,
}

impl FileStorage {
    /// Opens (or creates) the journal at `path`, reads every record, truncates a torn tail, and
    /// returns the storage positioned for appending. A tail of zeros after the last record is
    /// the room a running broker grew the file by ([`ROOM_STEP`]): it is kept, not cut.
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
        apply: impl FnMut(Vec<Event>),
    ) -> Result<(FileStorage, Replayed), JournalError> {
        let err = |what: &str, e: std::io::Error| JournalError(format!("journal {}: {what}: {e}", path.display()));
        // Not `append`: appends land at the end of the last record, inside the room after it.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| err("cannot open", e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut bytes).map_err(|e| err("cannot read", e))?;
        reserve(count_records(&bytes));
        let good_len = replay(&bytes, apply).map_err(|e| JournalError(format!("journal {}: {e}", path.display())))?;
        let tail = bytes.get(usize::try_from(good_len).unwrap_or(usize::MAX)..).unwrap_or_default();
        // Where the next append lands, the file's length after it (the room), and what was cut.
        let (len, room, truncated) = if good_len == 0 {
            // New, or a crash while its magic was being written: (re)initialise it, so nothing is
            // ever appended to a file without the magic.
            file.set_len(0)
                .and_then(|()| file.write_all_at(MAGIC, 0))
                .and_then(|()| file.sync_all())
                .map_err(|e| err("cannot initialise", e))?;
            sync_dir(path).map_err(|e| err("cannot sync its directory", e))?;
            (MAGIC.len() as u64, MAGIC.len() as u64, bytes.len() as u64)
        } else if tail.iter().all(|b| *b == 0) {
            // The room (or blocks a crash left as zeros): the next append lands at its start.
            (good_len, bytes.len() as u64, 0)
        } else {
            // A torn record (in the room, zeros may follow it): cut, room and all. The next
            // append grows the file again.
            file.set_len(good_len).and_then(|()| file.sync_all()).map_err(|e| err("cannot truncate a torn tail", e))?;
            (good_len, good_len, tail.len() as u64)
        };
        let storage = FileStorage { path: path.to_path_buf(), file, end: len, room };
        Ok((storage, Replayed { events: Vec::new(), truncated, len }))
    }
}

/// Decodes `bytes` on a second thread while this one hands the events to `apply`, in order, in
/// batches of [`REPLAY_BATCH`]. Returns the length of the good prefix ([`decode_with`]).
fn replay(bytes: &[u8], mut apply: impl FnMut(Vec<Event>)) -> Result<u64, String> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Event>>(8);
        let decoder = scope.spawn(|| {
            let mut batch = Vec::with_capacity(REPLAY_BATCH);
            let result = decode_with(bytes, |event| {
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
}

impl Storage for FileStorage {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.end)?;
        self.end += bytes.len() as u64;
        if self.end > self.room && bytes.len() < LARGE_BATCH {
            // Out of room: a step of zeros after the records, made durable by the same sync
            // ([`ROOM_STEP`]). Without it the records are still whole: on a disk too full for
            // the zeros, appends go on growing the file until not even they fit.
            let zeros = vec![0; ROOM_STEP as usize]; // calloc: fresh zero pages, nothing to clear
            self.room = match self.file.write_all_at(&zeros, self.end) {
                Ok(()) => self.end + ROOM_STEP,
                Err(_) => self.end, // what zeros did land are harmless: replay stops at them
            };
        }
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        // The room goes too: a failed write may have left part of itself anywhere in it.
        self.file.set_len(len)?;
        (self.end, self.room) = (len, len);
        Ok(())
    }

    fn start_replacement(&mut self) -> std::io::Result<Box<dyn Replacement>> {
        let tmp = self.path.with_extension("compact");
        Ok(Box::new(OpenOptions::new().write(true).create(true).truncate(true).open(tmp)?))
    }

    fn install(&mut self, replacement: Box<dyn Replacement>) -> std::io::Result<()> {
        drop(replacement);
        std::fs::rename(self.path.with_extension("compact"), &self.path)?;
        sync_dir(&self.path)?;
        let new = OpenOptions::new().read(true).write(true).open(&self.path)?;
        // Its length is its records: the first append grows it a room.
        let len = new.metadata()?.len();
        let old = std::mem::replace(&mut self.file, new);
        (self.end, self.room) = (len, len);
        // The old journal is unlinked now, and this handle is all that keeps its blocks. A
        // thread of its own frees them, a step at a time ([`release`]).
        let _ = std::thread::Builder::new().name("ephemera-unlink".into()).spawn(move || {
            let _ = release(&old, || std::thread::sleep(RELEASE_REST));
        });
        Ok(())
    }

    fn read_range(&mut self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        JournalReader::read_at(&self.file, from, to)
    }

    fn reader(&mut self) -> std::io::Result<Box<dyn JournalReader>> {
        Ok(Box::new(File::open(&self.path)?))
    }
}

/// How much of a replaced journal [`release`] frees at a time, and how long it rests between.
const RELEASE_STEP: u64 = 8 * 1024 * 1024;
const RELEASE_REST: std::time::Duration = std::time::Duration::from_millis(5);

/// Frees a replaced (already unlinked) journal's blocks [`RELEASE_STEP`] at a time, calling
/// `rest` between steps; returns the number of steps. Closing the last handle of a journal of a
/// million leases frees a few hundred MB at once, and measured here (ext4 mounted with
/// `discard`) that stalled **every other file's fdatasync on the disk** for ~30 ms: the next
/// group commit's, and so every exchange waiting on it. Cut back 8 MiB at a time with 5 ms
/// rests, the worst concurrent fdatasync stayed under 4 ms, and 400 MB took ~0.35 s to free.
/// (RocksDB frees obsolete files the same way, for the same reason: its `DeleteScheduler`'s
/// `bytes_max_delete_chunk`, one `ftruncate` per chunk.)
fn release(file: &File, mut rest: impl FnMut()) -> std::io::Result<usize> {
    let mut len = file.metadata()?.len();
    let mut steps = 0;
    while len > 0 {
        len = len.saturating_sub(RELEASE_STEP);
        file.set_len(len)?;
        steps += 1;
        if len > 0 {
            rest();
        }
    }
    Ok(steps)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::journal::format::encode;
    use crate::ledger::journal::format::tests::{events, file_with};

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

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    fn record(events: &[Event]) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode(events, &mut bytes);
        bytes
    }

    fn revoked(i: usize) -> Event {
        Event::Revoked { id: format!("lse_{i}"), at: i as i64 }
    }

    /// A journal `FileStorage` wrote two records to, synced and closed: the room after them.
    fn written_journal(dir: &Path) -> PathBuf {
        let path = dir.join("journal");
        let (mut storage, _) = FileStorage::open(&path).unwrap();
        storage.append(&record(&events(2))).unwrap();
        storage.sync().unwrap();
        path
    }

    #[test]
    fn appends_land_in_zeros_grown_a_step_ahead_so_the_file_changes_size_once_a_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut storage, opened) = FileStorage::open(&path).unwrap();
        let first = record(&events(1));
        storage.append(&first).unwrap();
        storage.sync().unwrap();
        let grown = opened.len + first.len() as u64 + ROOM_STEP;
        assert_eq!(size(&path), grown, "the first append grows the file a step past itself");
        // Appends until the room is used up leave the size alone (no inode for fdatasync to write).
        let mut end = opened.len + first.len() as u64;
        let mut appended = events(1);
        let mut i = 1;
        let (last, bytes) = loop {
            let event = revoked(i);
            let bytes = record(std::slice::from_ref(&event));
            if end + bytes.len() as u64 > grown {
                break (event, bytes);
            }
            storage.append(&bytes).unwrap();
            (end, i) = (end + bytes.len() as u64, i + 1);
            appended.push(event);
            assert_eq!(size(&path), grown, "append {i} changed the size inside the room");
        };
        storage.sync().unwrap();
        // The one that does not fit grows it again, by a step past its own end.
        storage.append(&bytes).unwrap();
        end += bytes.len() as u64;
        assert_eq!(size(&path), end + ROOM_STEP);
        appended.push(last);
        drop(storage);
        let (_, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!(replayed.events, appended);
        assert_eq!((replayed.len, replayed.truncated), (end, 0));
    }

    #[test]
    fn a_batch_too_large_to_gain_from_room_grows_none_and_the_next_small_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut storage, opened) = FileStorage::open(&path).unwrap();
        let large: Vec<Event> = (0..LARGE_BATCH / 20).map(revoked).collect();
        let bytes = record(&large);
        assert!(bytes.len() >= LARGE_BATCH, "the test's batch is too small: {} bytes", bytes.len());
        storage.append(&bytes).unwrap();
        let end = opened.len + bytes.len() as u64;
        assert_eq!(size(&path), end, "a large batch wrote a MiB of zeros after itself");
        storage.append(&record(&[revoked(1)])).unwrap();
        let end = end + record(&[revoked(1)]).len() as u64;
        assert_eq!(size(&path), end + ROOM_STEP, "the small batch after it grew no room");
        drop(storage);
        let (_, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!(replayed.events, [large, vec![revoked(1)]].concat());
    }

    #[test]
    fn a_start_keeps_the_zero_room_and_appends_after_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = written_journal(dir.path());
        let grown = size(&path);
        let (mut storage, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!((replayed.events, replayed.truncated), (events(2), 0), "the room is not a torn tail");
        assert_eq!(size(&path), grown, "the start cut the room");
        storage.append(&record(&[revoked(9)])).unwrap();
        storage.sync().unwrap();
        assert_eq!(size(&path), grown, "the append after a restart did not land in the room");
        drop(storage);
        let (_, again) = FileStorage::open(&path).unwrap();
        assert_eq!(
            again.events,
            [events(2), vec![revoked(9)]].concat(),
            "the record appended after the restart is lost"
        );
    }

    #[test]
    fn a_torn_append_in_the_room_is_cut_room_and_all_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = written_journal(dir.path());
        let good = FileStorage::open(&path).unwrap().1.len;
        // A crash mid-append: a header promising 500 bytes, and only 10 of them, zeros after.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[244, 1, 0, 0, 1, 2, 3, 4, b'{', b'"'], good).unwrap();
        drop(file);
        let (mut storage, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!(replayed.events, events(2));
        assert_eq!(replayed.len, good);
        assert!(replayed.truncated > 10, "only the torn bytes counted: {}", replayed.truncated);
        assert_eq!(size(&path), good, "the torn tail was not cut");
        storage.append(&record(&events(1))).unwrap();
        drop(storage);
        let (_, again) = FileStorage::open(&path).unwrap();
        assert_eq!(again.events.len(), 3);
    }

    #[test]
    fn an_append_cut_back_after_a_failure_leaves_nothing_of_itself_for_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut storage, opened) = FileStorage::open(&path).unwrap();
        storage.append(&record(&events(1))).unwrap();
        let end = opened.len + record(&events(1)).len() as u64;
        // What a write that failed halfway leaves: part of a record inside the room.
        storage.append(&record(&events(3))[..30]).unwrap();
        storage.truncate(end).unwrap();
        assert_eq!(size(&path), end);
        storage.append(&record(&[revoked(7)])).unwrap();
        drop(storage);
        let (_, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!(replayed.events, [events(1), vec![revoked(7)]].concat());
        assert_eq!(replayed.truncated, 0);
    }

    #[test]
    fn a_replaced_journal_is_freed_a_step_at_a_time_with_a_rest_between() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old-journal");
        let file = OpenOptions::new().read(true).append(true).create(true).open(&path).unwrap();
        file.set_len(2 * RELEASE_STEP + 1).unwrap();
        std::fs::remove_file(&path).unwrap(); // renamed over, as `install` leaves it
        let mut lengths = Vec::new();
        let steps = release(&file, || lengths.push(file.metadata().unwrap().len())).unwrap();
        assert_eq!(steps, 3);
        assert_eq!(lengths, [RELEASE_STEP + 1, 1], "a rest after every step but the last");
        assert_eq!(file.metadata().unwrap().len(), 0);
        assert_eq!(release(&file, || panic!("nothing left to rest after")).unwrap(), 0);
    }

    #[test]
    fn a_crash_while_writing_the_magic_leaves_a_journal_that_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        std::fs::write(&path, &MAGIC[..3]).unwrap();
        let (mut storage, replayed) = FileStorage::open(&path).unwrap();
        assert_eq!((replayed.events.len(), replayed.len), (0, MAGIC.len() as u64));
        storage.append(&record(&events(1))).unwrap();
        drop(storage);
        let (_, again) = FileStorage::open(&path).unwrap();
        assert_eq!(again.events, events(1), "the next start must read what was appended");
    }
}
