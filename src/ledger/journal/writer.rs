//! The journal's writer thread: group commit, and compaction without making appends wait (both
//! in the [module docs](super)).

use super::file::{JournalReader, Replacement, Storage};
use super::format::MAGIC;
use super::{JournalError, SnapshotSource, Stats};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc::{self, WeakSender};
use tokio::sync::oneshot;

/// How many queued appends one fsync may cover.
pub(super) const MAX_BATCH: usize = 4096;

/// A compaction's file is synced after every this many bytes, so its dirty pages never pile up
/// into one long writeback that the appends' fsyncs would queue behind.
const SYNC_EVERY: u64 = 4 * 1024 * 1024;

/// Records appended while a compaction runs are copied to its file by the compaction's thread
/// until fewer than this many bytes are left; the writer copies that rest itself, in the one
/// pause appends see (module docs).
const CATCH_UP_BYTES: u64 = 256 * 1024;

/// The piece the compaction's thread copies from the journal at a time.
const COPY_CHUNK: u64 = 1024 * 1024;

/// Where the writer answers a command.
pub(super) type Done = oneshot::Sender<Result<Compacted, JournalError>>;
/// Where the writer answers an append.
pub(super) type Appended = oneshot::Sender<Result<(), JournalError>>;

/// What a finished compaction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Records in its snapshot.
    pub records: usize,
    /// Bytes of the magic and the snapshot.
    pub snapshot_bytes: u64,
    /// Bytes of the new journal when it was put in place.
    pub len: u64,
    /// How long appends waited while the writer copied the last records over and put the new
    /// file in place: the compaction's one pause.
    pub pause_micros: u64,
    /// The bytes the writer copied in that pause (the compaction's thread copied the rest).
    pub copied_in_pause: u64,
    /// CPU time of the compaction's thread (snapshot, encoding, copying; 10 ms resolution).
    pub cpu_micros: u64,
}

pub(super) enum Command {
    Append {
        bytes: Vec<u8>,
        done: Appended,
    },
    Compact {
        source: SnapshotSource,
        /// Carry over from here instead of from the last compaction's mark.
        since: Option<u64>,
        done: Done,
    },
    /// From the compaction's thread: its file, written and synced up to `copied_to` of the
    /// journal, or why not.
    Written {
        written: std::io::Result<Written>,
    },
}

/// A compaction's file as its thread hands it back to the writer.
pub(super) struct Written {
    replacement: Box<dyn Replacement>,
    records: usize,
    snapshot_bytes: u64,
    /// Where, in the new file, the records appended since the compaction began start: what the
    /// next compaction carries over.
    carried_from: u64,
    /// How far into the journal its records have been copied.
    copied_to: u64,
    /// The new file's length so far.
    len: u64,
    cpu_micros: u64,
}

/// The single writer: takes every queued append, writes them, one fsync, answers all (group
/// commit), and runs compactions without making appends wait for them (both in the module docs).
/// It ends when every sender is gone, after answering everything queued.
pub(super) fn writer(
    storage: Box<dyn Storage>,
    len: u64,
    mut rx: mpsc::Receiver<Command>,
    tx: WeakSender<Command>,
    stats: Arc<Stats>,
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
fn gather(first: Command, rx: &mut mpsc::Receiver<Command>) -> (Vec<(Vec<u8>, Appended)>, Option<Command>) {
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
struct Writer {
    storage: Box<dyn Storage>,
    /// The journal's length: where the next append lands.
    len: u64,
    /// Where the records not yet carried over by a compaction begin.
    since_compaction: u64,
    /// Who waits for the compaction being written, if one is.
    compacting: Option<Done>,
    /// One batch's appends, concatenated (kept for its allocation).
    batch: Vec<u8>,
    /// For the compaction thread to report back ([`Command::Written`]); weak, so that the
    /// writer ends when the last `Journal` handle is dropped.
    tx: WeakSender<Command>,
    stats: Arc<Stats>,
}

impl Writer {
    /// Writes `appends` with one fsync and answers each.
    fn append(&mut self, appends: Vec<(Vec<u8>, Appended)>) {
        if appends.is_empty() {
            return;
        }
        self.batch.clear();
        appends.iter().for_each(|(bytes, _)| self.batch.extend_from_slice(bytes));
        let result = write_batch(&mut *self.storage, &mut self.len, &self.batch, &self.stats);
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
            Command::Compact { source, since, done } => {
                // Never past the journal's end, and never later than it may be: a caller's
                // `since` only ever shortens what is carried over.
                let since = since.map_or(self.since_compaction, |s| s.min(self.len));
                let job = Job { source, since, mark: self.len, stats: self.stats.clone() };
                match start_compaction(&mut *self.storage, job, &self.tx) {
                    Ok(()) => self.compacting = Some(done),
                    Err(e) => drop(done.send(Err(e))),
                }
            }
            Command::Written { written } => {
                let Some(done) = self.compacting.take() else { return };
                let result = match written {
                    Ok(written) => self.finish_compaction(written),
                    Err(e) => Err(JournalError(format!("journal compaction failed: {e}"))),
                };
                let _ = done.send(result);
            }
        }
    }

    /// Finishes a compaction whose file is written up to `copied_to` of the journal: copies the
    /// few records appended since (at most about [`CATCH_UP_BYTES`]), syncs, and puts it in
    /// place of the journal. Appends wait only for this.
    fn finish_compaction(&mut self, written: Written) -> Result<Compacted, JournalError> {
        let started = std::time::Instant::now();
        let failed = |e: std::io::Error| JournalError(format!("journal compaction failed: {e}"));
        if self.stats.broken.load(Ordering::Acquire) {
            return Err(JournalError("the journal is broken after an earlier write failure; not compacting".into()));
        }
        let Written { mut replacement, records, snapshot_bytes, carried_from, copied_to, len, cpu_micros } = written;
        let rest = self.storage.read_range(copied_to, self.len).map_err(failed)?;
        replacement.write(&rest).and_then(|()| replacement.sync()).map_err(failed)?;
        self.storage.install(replacement).map_err(|e| {
            // Renamed but not reopened, or worse: appends cannot be trusted to reach the journal.
            self.stats.broken.store(true, Ordering::Release);
            failed(e)
        })?;
        self.len = len + rest.len() as u64;
        self.since_compaction = carried_from;
        self.stats.len.store(self.len, Ordering::Release);
        self.stats.bytes_since_compaction.store(self.len - carried_from, Ordering::Relaxed);
        self.stats.snapshot_bytes.store(snapshot_bytes, Ordering::Relaxed);
        let pause_micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(Compacted {
            records,
            snapshot_bytes,
            len: self.len,
            pause_micros,
            copied_in_pause: rest.len() as u64,
            cpu_micros,
        })
    }
}

/// A compaction's work, for its thread: the snapshot, and the journal's records from `since`
/// (those the previous compaction did not fold in) up to `mark` (where the journal stood when
/// this one began), then those appended meanwhile, as far as `stats.len` says is durable.
struct Job {
    source: SnapshotSource,
    since: u64,
    mark: u64,
    stats: Arc<Stats>,
}

/// Starts writing a compaction's file on a thread of its own, which reports back with
/// [`Command::Written`].
fn start_compaction(storage: &mut dyn Storage, job: Job, tx: &WeakSender<Command>) -> Result<(), JournalError> {
    let failed = |e: std::io::Error| JournalError(format!("journal compaction failed: {e}"));
    if job.stats.broken.load(Ordering::Acquire) {
        return Err(JournalError("the journal is broken after an earlier write failure; not compacting".into()));
    }
    let reader = storage.reader().map_err(failed)?;
    let replacement = storage.start_replacement().map_err(failed)?;
    let tx = tx.upgrade().ok_or_else(|| JournalError("the journal is shutting down".into()))?;
    std::thread::Builder::new()
        .name("ephemera-compact".into())
        .spawn(move || {
            yield_to_requests();
            let written = write_compaction(job, reader, replacement);
            let _ = tx.blocking_send(Command::Written { written });
        })
        .map(|_| ())
        .map_err(failed)
}

/// How much lower than the rest of the broker a compaction's thread runs (its nice value, added
/// to the process's). Compaction can wait; an exchange's reply cannot. Measured with 1M live
/// leases at half of saturation (bench row 11a, docs/benchmarks.md): at the process's priority a
/// compaction running through a window raised the window's p99 ×9 over a broker without one (a
/// queue before the handler: the exchanges got too little CPU), at +10 ×1.4–3.3. Not +19: against
/// three busy threads of the broker's priority a thread at +19 gets ~0.5 % of a core (CPU shares
/// by weight: 15 against 1024 each), at +10 ~3.5 % (110), and a compaction must still finish
/// under full load, copying the appends made meanwhile. An unprivileged process cannot raise a
/// thread's priority again, so this is one value, set once per thread.
const COMPACTION_NICENESS: i32 = 10;

/// Lowers the calling thread's CPU priority by [`COMPACTION_NICENESS`]: on Linux a nice value
/// belongs to a thread, so only the compaction's thread runs lower. Best effort: where that
/// fails, the compaction runs at the broker's priority, as it did before.
fn yield_to_requests() {
    let lowered = rustix::process::getpriority_process(None)
        .and_then(|now| rustix::process::setpriority_process(None, (now + COMPACTION_NICENESS).min(19)));
    if let Err(e) = lowered {
        tracing::debug!(error = %e, "the compaction thread runs at the broker's priority");
    }
}

/// A compaction's file, synced every [`SYNC_EVERY`] bytes, written with at most a quarter of a
/// core: after every stretch of [`REST_AFTER`] the thread rests [`REST_PER_WORK`] times the CPU
/// time it used in it (encoding included), so a compaction never takes more than a quarter of
/// a core from the request path, however large the live set. A compaction takes four times its
/// CPU time; appends never wait for it, and the next one is not due until `compact_ratio` of
/// the snapshot has been appended again.
///
/// CPU time, not wall time: a stretch the thread spent waiting (for a core, at its lower
/// priority, while the exchanges keep both busy; or for the disk) took nothing from anyone, and
/// resting for it too would slow a compaction most exactly when appends pile up fastest, under
/// full load, where it must still finish and catch up with them.
struct Paced {
    file: Box<dyn Replacement>,
    len: u64,
    unsynced: u64,
    /// The start of the current stretch: its wall time, and the thread's CPU time.
    since: std::time::Instant,
    cpu_since: std::time::Duration,
    /// Sleeps (a test records instead).
    rest: fn(std::time::Duration),
}

impl Paced {
    fn new(file: Box<dyn Replacement>, rest: fn(std::time::Duration)) -> Paced {
        Paced { file, len: 0, unsynced: 0, since: std::time::Instant::now(), cpu_since: thread_cpu_time(), rest }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write(bytes)?;
        self.len += bytes.len() as u64;
        self.unsynced += bytes.len() as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync()?;
            self.unsynced = 0;
        }
        if self.since.elapsed() >= REST_AFTER {
            let cpu = thread_cpu_time();
            (self.rest)(rest_after(cpu.saturating_sub(self.cpu_since)));
            (self.since, self.cpu_since) = (std::time::Instant::now(), cpu);
        }
        Ok(())
    }
}

/// The rest after a stretch in which the compaction's thread used `cpu`: [`REST_PER_WORK`]
/// times as long, capped so that one long stretch does not turn into a stalled compaction.
fn rest_after(cpu: std::time::Duration) -> std::time::Duration {
    (cpu * REST_PER_WORK).min(std::time::Duration::from_millis(150))
}

/// The calling thread's CPU time (user and system) since it started; zero where the clock
/// cannot be read (then a compaction does not rest). The fallible call: rustix's infallible
/// `clock_gettime` panics on a kernel without this clock, which would end the compaction's
/// thread without an answer.
fn thread_cpu_time() -> std::time::Duration {
    use rustix::time::{ClockId, DynamicClockId, clock_gettime_dynamic};
    clock_gettime_dynamic(DynamicClockId::Known(ClockId::ThreadCPUTime)).map_or(std::time::Duration::ZERO, |t| {
        std::time::Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0))
    })
}

/// How much work a compaction's thread does between rests ([`Paced`]).
const REST_AFTER: std::time::Duration = std::time::Duration::from_millis(5);

/// How long a compaction's thread rests after a stretch of work, in stretches. What a
/// compaction takes of the cores comes out of the exchanges' share when they are busy: with 1M
/// live leases at half of saturation on two cores (bench row 11a), paced to half a core (rest 1)
/// the typical window's p99 was 1.02–1.49× that of a broker without a compaction, with windows
/// up to 55 ms; at a quarter 0.78–1.01× in four runs, none over 14.6 ms (docs/benchmarks.md).
const REST_PER_WORK: u32 = 3;

/// The compaction thread's work: the magic, the snapshot (streamed from its source), the
/// records since the previous compaction, then the appends made meanwhile, until fewer than
/// [`CATCH_UP_BYTES`] are left for the writer.
fn write_compaction(
    Job { source, since, mark, stats }: Job,
    reader: Box<dyn JournalReader>,
    replacement: Box<dyn Replacement>,
) -> std::io::Result<Written> {
    let mut out = Paced::new(replacement, std::thread::sleep);
    out.write(MAGIC)?;
    let records = source(&mut |bytes| out.write(bytes))?;
    let snapshot_bytes = out.len;
    let carried_from = snapshot_bytes + (mark - since);
    let (mut from, mut to) = (since, mark);
    loop {
        while from < to {
            let end = to.min(from + COPY_CHUNK);
            out.write(&reader.read_at(from, end)?)?;
            from = end;
        }
        // Durable bytes only: what an append has not finished may still be cut back.
        let durable = stats.len.load(Ordering::Acquire);
        if durable.saturating_sub(from) < CATCH_UP_BYTES {
            break;
        }
        to = durable;
    }
    out.file.sync()?;
    let cpu_micros = u64::try_from(thread_cpu_time().as_micros()).unwrap_or(u64::MAX);
    Ok(Written {
        replacement: out.file,
        records,
        snapshot_bytes,
        carried_from,
        copied_to: from,
        len: out.len,
        cpu_micros,
    })
}

fn write_batch(storage: &mut dyn Storage, len: &mut u64, batch: &[u8], stats: &Stats) -> Result<(), JournalError> {
    if stats.broken.load(Ordering::Acquire) {
        return Err(JournalError("the journal is broken after an earlier write failure; restart the broker".into()));
    }
    match storage.append(batch).and_then(|()| storage.sync()) {
        Ok(()) => {
            *len += batch.len() as u64;
            stats.len.store(*len, Ordering::Release);
            stats.appended_bytes.fetch_add(batch.len() as u64, Ordering::Relaxed);
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

    #[test]
    fn a_compaction_rests_for_the_cpu_it_used_not_for_the_time_it_spent_waiting() {
        use std::time::Duration;
        thread_local! { static RESTS: std::cell::RefCell<Vec<Duration>> = const { std::cell::RefCell::new(Vec::new()) }; }
        fn record(rest: Duration) {
            RESTS.with(|r| r.borrow_mut().push(rest));
        }
        let taken = || RESTS.with(|r| std::mem::take(&mut *r.borrow_mut()));
        /// Holds each write 6 ms without using the CPU: a slow disk, or a core the exchanges
        /// keep busy while the compaction's thread waits at its lower priority.
        struct Waiting;
        impl Replacement for Waiting {
            fn write(&mut self, _: &[u8]) -> std::io::Result<()> {
                std::thread::sleep(Duration::from_millis(6));
                Ok(())
            }
            fn sync(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        /// Takes 6 ms of CPU a write (encoding, copying).
        struct Busy;
        impl Replacement for Busy {
            fn write(&mut self, _: &[u8]) -> std::io::Result<()> {
                let start = thread_cpu_time();
                while thread_cpu_time() - start < Duration::from_millis(6) {}
                Ok(())
            }
            fn sync(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut waiting = Paced::new(Box::new(Waiting), record);
        for _ in 0..3 {
            waiting.write(b"x").unwrap();
        }
        let rests = taken();
        assert_eq!(rests.len(), 3, "a stretch of 6 ms is over REST_AFTER: one rest after each");
        assert!(rests.iter().all(|r| *r < Duration::from_millis(3)), "rested for time spent waiting: {rests:?}");
        let mut busy = Paced::new(Box::new(Busy), record);
        for _ in 0..3 {
            busy.write(b"x").unwrap();
        }
        let rests = taken();
        assert_eq!(rests.len(), 3);
        assert!(
            rests.iter().all(|r| *r >= Duration::from_millis(18)),
            "6 ms of CPU, rested less than 3 × that: {rests:?}"
        );
        assert_eq!(
            rest_after(Duration::from_secs(1)),
            Duration::from_millis(150),
            "one long stretch does not stall it"
        );
    }

    #[test]
    fn a_compaction_thread_runs_lower_than_the_broker_and_only_it_does() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let inside = std::thread::spawn(|| {
            yield_to_requests();
            rustix::process::getpriority_process(None).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before + COMPACTION_NICENESS).min(19));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before, "the other threads keep theirs");
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
        fn reader(&mut self) -> std::io::Result<Box<dyn JournalReader>> {
            self.inner.reader()
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
    async fn appends_made_during_a_long_snapshot_are_copied_by_the_compaction_thread_not_in_the_pause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (storage, opened) = FileStorage::open(&path).unwrap();
        let journal = Journal::start(Box::new(storage), opened.len);
        journal.append(&[lease(0)]).await.unwrap();
        let (started, in_source) = std::sync::mpsc::channel();
        let (release, go) = std::sync::mpsc::channel::<()>();
        let compaction = tokio::spawn({
            let journal = journal.clone();
            // The snapshot takes as long as the test wants: a million leases' worth.
            async move {
                journal
                    .compact_from(
                        Box::new(move |sink| {
                            started.send(()).unwrap();
                            go.recv().unwrap();
                            let mut bytes = Vec::new();
                            crate::ledger::journal::SnapshotEncoder::default().encode(&[lease(0)], &mut bytes);
                            sink(&bytes).map(|()| 1)
                        }),
                        None,
                    )
                    .await
            }
        });
        tokio::task::spawn_blocking(move || in_source.recv().unwrap()).await.unwrap();
        let mut appended = Vec::new();
        for chunk in 1..=40 {
            let batch: Vec<Event> = (chunk * 100..chunk * 100 + 100).map(lease).collect();
            journal.append(&batch).await.unwrap();
            appended.extend(batch);
        }
        let appended_bytes = journal.stats().len.load(Ordering::Acquire) - opened.len;
        assert!(appended_bytes > 4 * CATCH_UP_BYTES, "the test appends too little: {appended_bytes} bytes");
        release.send(()).unwrap();
        let compacted = compaction.await.unwrap().unwrap();
        assert!(
            compacted.copied_in_pause < CATCH_UP_BYTES,
            "appends waited while the writer copied {} bytes",
            compacted.copied_in_pause
        );
        journal.append(&[lease(9999)]).await.unwrap();
        drop(journal);
        let (decoded, _) = decode(&std::fs::read(&path).unwrap()).unwrap();
        // The snapshot, the record it carries over, every append made meanwhile, in order.
        let mut expected = vec![lease(0), lease(0)];
        expected.extend(appended);
        expected.push(lease(9999));
        assert_eq!(decoded.len(), expected.len());
        assert!(decoded == expected, "the compacted journal lost or reordered a record");
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
