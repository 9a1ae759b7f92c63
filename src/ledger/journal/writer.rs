//! The journal's writer thread: group commit, and compaction without making appends wait (both
//! in the [module docs](super)).

use super::file::{Replacement, Storage};
use super::format::MAGIC;
use super::{JournalError, Stats};
use std::sync::atomic::Ordering;
use tokio::sync::mpsc::{self, WeakSender};
use tokio::sync::oneshot;

/// How many queued appends one fsync may cover.
pub(super) const MAX_BATCH: usize = 4096;

/// Where the writer answers a command.
pub(super) type Done = oneshot::Sender<Result<(), JournalError>>;

pub(super) enum Command {
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

/// The single writer: takes every queued append, writes them, one fsync, answers all (group
/// commit), and runs compactions without making appends wait for them (both in the module docs).
/// It ends when every sender is gone, after answering everything queued.
pub(super) fn writer(
    storage: Box<dyn Storage>,
    len: u64,
    mut rx: mpsc::Receiver<Command>,
    tx: WeakSender<Command>,
    stats: &Stats,
) {
    let mut state = Writer { storage, len, since_compaction: len, compacting: None, batch: Vec::new(), tx, stats };
    while let Some(first) = rx.blocking_recv() {
        let (appends, other) = gather(first, &mut rx);
        state.append(appends);
        if let Some(command) = other {
            state.handle(command);
        }
    }
}

/// `first` and the appends queued behind it, up to [`MAX_BATCH`] of them: what one fsync covers.
/// Stops at the first command that is not an append, which comes back to run after them.
fn gather(first: Command, rx: &mut mpsc::Receiver<Command>) -> (Vec<(Vec<u8>, Done)>, Option<Command>) {
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
    (appends, other)
}

/// What the writer thread keeps between commands.
struct Writer<'a> {
    storage: Box<dyn Storage>,
    /// The journal's length: where the next append lands.
    len: u64,
    /// Where the records not yet carried over by a compaction begin.
    since_compaction: u64,
    /// The compaction being written: where the journal stood when it started, its file's length
    /// so far, and who waits for it.
    compacting: Option<((u64, u64), Done)>,
    /// One batch's appends, concatenated (kept for its allocation).
    batch: Vec<u8>,
    /// For the compaction thread to report back ([`Command::Written`]); weak, so that the
    /// writer ends when the last `Journal` handle is dropped.
    tx: WeakSender<Command>,
    stats: &'a Stats,
}

impl Writer<'_> {
    /// Writes `appends` with one fsync and answers each.
    fn append(&mut self, appends: Vec<(Vec<u8>, Done)>) {
        if appends.is_empty() {
            return;
        }
        self.batch.clear();
        appends.iter().for_each(|(bytes, _)| self.batch.extend_from_slice(bytes));
        let result = write_batch(&mut *self.storage, &mut self.len, &self.batch, self.stats);
        for (_, done) in appends {
            let _ = done.send(result.clone());
        }
    }

    /// A command that is not an append ([`gather`] batches those).
    fn handle(&mut self, command: Command) {
        match command {
            Command::Append { bytes, done } => self.append(vec![(bytes, done)]),
            Command::Compact { done, .. } if self.compacting.is_some() => {
                let _ = done.send(Err(JournalError("a compaction is already running".into())));
            }
            Command::Compact { snapshot, done } => {
                let (since, len) = (self.since_compaction, self.len);
                match start_compaction(&mut *self.storage, since, len, snapshot, &self.tx, self.stats) {
                    Ok(prefix) => self.compacting = Some(((len, prefix), done)),
                    Err(e) => drop(done.send(Err(e))),
                }
            }
            Command::Written { replacement } => {
                let Some((at, done)) = self.compacting.take() else { return };
                let result = match replacement {
                    Ok(replacement) => {
                        finish_compaction(&mut *self.storage, &mut self.len, at, replacement, self.stats)
                    }
                    Err(e) => Err(JournalError(format!("journal compaction failed: {e}"))),
                };
                if let Ok(carried_from) = result {
                    self.since_compaction = carried_from;
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
    use crate::ledger::Event;
    use crate::ledger::journal::format::tests::{events, lease};
    use crate::ledger::journal::format::{DICT_LEASE, decode};
    use crate::ledger::journal::{FileStorage, Journal};
    use std::sync::Arc;

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
        let ledger = crate::ledger::FileStore::in_memory(crate::ledger::FileStoreOptions::default());
        replayed.events.into_iter().for_each(|e| ledger.apply(e));
        for i in 1..=3 {
            let lease = crate::ledger::LeaseStore::get(&ledger, &format!("lse_{i}")).await.unwrap();
            assert!(lease.is_some(), "lease {i} was lost by compaction");
        }
        assert_eq!(ledger.len(), 3);
    }
}
