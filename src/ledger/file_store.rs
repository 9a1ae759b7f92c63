//! The embedded store, and the default: leases in process memory ([`Memory`]), every change
//! recorded in the [`journal`](super::journal) under the data directory, replayed at start.
//!
//! Order of each change: a new lease is written, then made visible (nothing is in memory unless
//! it is on disk). A revocation's claim is made in memory first, because the credentials must
//! die even when the disk will not take a record; its outcome is written first and only then
//! applied, so the lease reads `revoked` only once that is durable — until then it stays
//! pending and its stalled-attempt retry runs it again.

use super::journal::{Compacted, FileStorage, Journal, JournalError, SnapshotEncoder, SnapshotSource, Storage};
use super::memory::Memory;
use super::sharded::SHARDS;
use super::store::{CompactionStats, Counts, Due, Health, IssueError, LeaseStore, LiveLease, Maintained, StoreError};
use super::{Event, Lease, LeaseCredential, LeaseFilter, LeaseState, REASON_EXPIRED, RetryPolicy, RevokeWork};
use crate::clock::UnixSeconds;
use crate::identity::ReplayKey;
use crate::mint::{BoxFuture, RevokeHandle};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::task::JoinHandle;

/// Wraps the journal's storage (fault injection in tests: a disk that fills up on cue).
pub type StorageWrap = Box<dyn FnOnce(Box<dyn Storage>) -> Box<dyn Storage> + Send>;

/// How the file store behaves; the config's `[ledger]` section.
#[derive(Debug, Clone, Copy)]
pub struct FileStoreOptions {
    pub retry: RetryPolicy,
    /// Compact the journal once this many bytes were appended since the last compaction began,
    /// and at least `compact_ratio` times the last compaction's snapshot.
    pub compact_bytes: u64,
    /// Appends between two compactions, as a share of the last snapshot: a compaction rewrites
    /// the live set, so spacing compactions in proportion to it keeps their cost per exchange
    /// the same whether a thousand leases are live or a million (issue 23). The journal is at
    /// most a snapshot and two such intervals long, which bounds replay.
    pub compact_ratio: f64,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        FileStoreOptions { retry: RetryPolicy::default(), compact_bytes: 64 * 1024 * 1024, compact_ratio: 0.5 }
    }
}

pub struct FileStore {
    /// Shared with a running compaction's thread, which reads its snapshot from here.
    memory: Arc<Memory>,
    /// `None`: memory only (tests, the bench).
    journal: Option<Journal>,
    options: FileStoreOptions,
    /// The compaction running in the background, if one is.
    compaction: Mutex<Option<JoinHandle<()>>>,
    /// Records written by compactions that finished since the last `maintain` asked.
    compacted: Arc<AtomicUsize>,
    /// Every compaction so far, for `/metrics`.
    totals: Arc<Totals>,
    /// Appends between their record and their effect in memory.
    appends: Arc<Appends>,
}

/// Appends whose records may be durable while their effect is not in memory yet, counted by
/// epoch. A compaction's snapshot is read from memory, so before it starts every record
/// already in the journal must be in memory too; the records after that point are carried over
/// into the new file as they are.
///
/// The compaction reads the journal's durable length first (`since`), then flips the epoch and
/// waits until the appends of the old epoch have left: every record before `since` was sent by
/// an append that entered before that read, hence in the old epoch, so its effect is in memory
/// once they have all left. An append that enters after the flip sends its record after `since`
/// was read, so that record is carried over. (The wait lasts about one group commit.)
#[derive(Default)]
struct Appends {
    epoch: AtomicUsize,
    in_flight: [AtomicUsize; 2],
}

impl Appends {
    fn enter(&self) -> Recording<'_> {
        let slot = self.epoch.load(Ordering::SeqCst) & 1;
        self.in_flight[slot].fetch_add(1, Ordering::SeqCst);
        Recording { appends: self, slot }
    }

    /// Flips the epoch and waits for every append that entered before the flip to leave.
    async fn drain(&self) {
        let old = self.epoch.fetch_add(1, Ordering::SeqCst) & 1;
        while self.in_flight[old].load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// An append on its way from the journal to memory ([`Appends`]).
struct Recording<'a> {
    appends: &'a Appends,
    slot: usize,
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        self.appends.in_flight[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

/// Compaction figures since the start ([`CompactionStats`]).
#[derive(Default)]
struct Totals {
    compactions: AtomicU64,
    cpu_micros: AtomicU64,
    pause_max_micros: AtomicU64,
    last_records: AtomicU64,
}

impl Totals {
    fn add(&self, c: &Compacted) {
        self.compactions.fetch_add(1, Ordering::Relaxed);
        self.cpu_micros.fetch_add(c.cpu_micros, Ordering::Relaxed);
        self.pause_max_micros.fetch_max(c.pause_micros, Ordering::Relaxed);
        self.last_records.store(c.records as u64, Ordering::Relaxed);
    }
}

impl FileStore {
    /// The counts, from the figures memory keeps up to date.
    pub fn counts_now(&self) -> Counts {
        let mut by_state = [0; 5];
        for state in LeaseState::ALL {
            by_state[state.index()] = self.memory.count(state);
        }
        Counts { by_state, active_by_backend: self.memory.active_by_backend() }
    }

    /// Opens `dir/journal` (created when absent): replays it into memory — a torn tail is cut,
    /// a corrupt record refuses the start, because dropping it could forget a lease that still
    /// needs revoking — and starts its writer.
    pub fn open(dir: &Path, options: FileStoreOptions, wrap: Option<StorageWrap>) -> Result<FileStore, String> {
        let path = dir.join("journal");
        let memory = std::cell::RefCell::new(Memory::default());
        let mut records = 0;
        let started = std::time::Instant::now();
        let (storage, replayed) = FileStorage::open_into(
            &path,
            |n| *memory.borrow_mut() = Memory::with_capacity(n),
            |batch| {
                records += batch.len();
                let memory = memory.borrow();
                batch.into_iter().for_each(|e| memory.apply(e));
            },
        )
        .map_err(|e| format!("refusing to start: {e}"))?;
        if replayed.truncated > 0 {
            tracing::warn!(path = %path.display(), bytes = replayed.truncated, "cut a torn tail from the journal (a crash mid-write)");
        }
        let storage: Box<dyn Storage> = Box::new(storage);
        let storage = match wrap {
            Some(wrap) => wrap(storage),
            None => storage,
        };
        let store = FileStore::new(memory.into_inner(), Some(Journal::start(storage, replayed.len)), options);
        let millis = started.elapsed().as_millis() as u64;
        tracing::info!(path = %path.display(), records, leases = store.memory.len(), millis, "journal replayed");
        Ok(store)
    }

    /// A store without a journal: nothing survives the process (tests, the bench).
    pub fn in_memory(options: FileStoreOptions) -> FileStore {
        FileStore::new(Memory::default(), None, options)
    }

    /// A store recording to `journal`, starting empty (the bench's durable-append rate).
    pub fn with_journal(journal: Journal, options: FileStoreOptions) -> FileStore {
        FileStore::new(Memory::default(), Some(journal), options)
    }

    fn new(memory: Memory, journal: Option<Journal>, options: FileStoreOptions) -> FileStore {
        FileStore {
            memory: Arc::new(memory),
            journal,
            options,
            compaction: Mutex::new(None),
            compacted: Arc::default(),
            totals: Arc::default(),
            appends: Arc::default(),
        }
    }

    /// Applies a journal record to memory as a replay would (the bench builds large stores so).
    pub fn apply(&self, event: Event) {
        self.memory.apply(event);
    }

    /// Leases remembered, in any state.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `events`; the guard it returns is to be held until their effect is in memory
    /// (a compaction waits for that: [`Appends`]).
    async fn record(&self, events: &[Event]) -> Result<Recording<'_>, JournalError> {
        let recording = self.appends.enter();
        match &self.journal {
            Some(j) => j.append(events).await.map(|()| recording),
            None => Ok(recording),
        }
    }

    async fn issue_now(&self, lease: Lease, replay: Option<&ReplayKey>) -> Result<(), IssueError> {
        // The reservation is the atomic step: of two exchanges racing with one token, the second
        // finds the key taken here, before anything of its lease is written.
        if let Some(key) = replay
            && !self.memory.reserve_jti(key.key(), key.until())
        {
            return Err(IssueError::Replayed);
        }
        let mut events = Vec::with_capacity(2);
        if let Some(key) = replay {
            events.push(Event::JtiUsed { key: key.key().to_string(), exp: key.until() });
        }
        let lease = Arc::new(lease);
        events.push(Event::Created { lease: lease.clone() });
        match self.record(&events).await {
            Ok(_recorded) => {
                self.memory.insert(lease);
                Ok(())
            }
            Err(e) => {
                if let Some(key) = replay {
                    self.memory.release_jti(key.key());
                }
                Err(IssueError::Store(StoreError(e.0)))
            }
        }
    }

    /// Memory first, under the lease's entry lock (so a revocation that starts next takes the
    /// new credentials too), then the journal; the caller hears `true` only once the record is
    /// durable. On a journal failure the credentials stay listed in memory (revoked with the
    /// lease) and the caller revokes them at once.
    async fn renew_now(&self, id: &str, credentials: &[LeaseCredential], now: UnixSeconds) -> Result<bool, StoreError> {
        let Some(event) = self.memory.renew(id, credentials, now) else { return Ok(false) };
        self.record(std::slice::from_ref(&event)).await.map_err(|e| StoreError(e.0))?;
        Ok(true)
    }

    async fn import_now(&self, records: &[Event]) -> Result<usize, StoreError> {
        check_importable(records)?;
        let before = self.memory.len();
        let _recorded = self.record(records).await.map_err(|e| StoreError(e.0))?;
        records.iter().for_each(|e| self.memory.apply(e.clone()));
        Ok(self.memory.len() - before)
    }

    async fn begin_now(&self, id: &str, reason: &str, now: UnixSeconds) -> Option<RevokeWork> {
        let work = self.memory.begin(id, reason, now)?;
        // Records that the revocation started, so a crash mid-revocation resumes it at start.
        // Only a hint for recovery: the outcome record is the one that counts (see the module
        // docs), so a failure here is logged, and the revocation goes on.
        if let Err(e) = self.record(&[revoke_requested(id, reason, now)]).await {
            tracing::error!(error = %e, lease_id = %id, "journal write failed for a revocation's start; its outcome will be recorded when the disk takes it");
        }
        Some(work)
    }

    async fn finish_now(
        &self,
        id: &str,
        error: Option<String>,
        now: UnixSeconds,
    ) -> Result<Option<LeaseState>, StoreError> {
        let Some(event) = self.memory.outcome(id, error, now, &self.options.retry) else { return Ok(None) };
        // Durable first: a lease must not read `revoked` (and so be forgotten, and after a
        // restart come back active) on the strength of a record the disk never took.
        let _recorded = self.record(std::slice::from_ref(&event)).await.map_err(|e| StoreError(e.0))?;
        self.memory.apply(event);
        Ok(self.memory.state(id))
    }

    async fn claim_due_now(&self, now: UnixSeconds, quiet: &BTreeSet<String>) -> Due {
        let (mut expired, mut ending) = (Vec::new(), Vec::new());
        for id in &self.memory.take_due_expiries(now) {
            if let Some(work) = self.memory.begin(id, REASON_EXPIRED, now) {
                if work.is_quiet(quiet) { ending.push(work) } else { expired.push(work) }
            }
        }
        // One append for every start, and for the quiet ones their end too (the outcome a
        // revocation would have recorded): durable before it is applied, as `finish_now` does.
        let started = |work: &RevokeWork| revoke_requested(&work.lease_id, REASON_EXPIRED, now);
        let outcomes: Vec<Event> = ending
            .iter()
            .filter_map(|work| self.memory.outcome(&work.lease_id, None, now, &self.options.retry))
            .collect();
        let mut events: Vec<Event> = expired.iter().chain(&ending).map(started).collect();
        events.extend(outcomes.iter().cloned());
        let ended = if events.is_empty() {
            Vec::new()
        } else {
            match self.record(&events).await {
                Ok(_recorded) => {
                    outcomes.into_iter().for_each(|event| self.memory.apply(event));
                    ending
                }
                Err(e) => {
                    // Not ended, then: they stay `revoking` and go the usual way, whose finish
                    // records their end when the disk takes it.
                    expired.append(&mut ending);
                    tracing::error!(error = %e, leases = expired.len(), "journal write failed for due expiries; their outcome will be recorded when the disk takes it");
                    Vec::new()
                }
            }
        };
        Due { expired, ended, retries: self.memory.claim_due_retries(now) }
    }

    async fn maintain_now(&self, now: UnixSeconds) -> Maintained {
        let forgotten = self.memory.forget_ended(now);
        let compacted = self.compact_if_grown();
        Maintained { forgotten, compacted }
    }

    /// Starts a compaction in the background when the journal has grown enough since the last
    /// (`compact_bytes`, `compact_ratio`), unless one runs. Returns the records written by one
    /// that finished since the last call (0: none).
    fn compact_if_grown(&self) -> usize {
        let Some(journal) = &self.journal else { return 0 };
        let finished = self.compacted.swap(0, Ordering::Relaxed);
        let mut running = self.compaction.lock().unwrap_or_else(PoisonError::into_inner);
        if running.as_ref().is_some_and(|task| !task.is_finished()) {
            return finished;
        }
        let stats = journal.stats();
        let grown = stats.bytes_since_compaction.load(Ordering::Relaxed);
        let snapshot = stats.snapshot_bytes.load(Ordering::Relaxed) as f64;
        if grown < self.options.compact_bytes || (grown as f64) < self.options.compact_ratio * snapshot {
            return finished;
        }
        let (journal, memory, appends) = (journal.clone(), self.memory.clone(), self.appends.clone());
        let (compacted, totals) = (self.compacted.clone(), self.totals.clone());
        *running = Some(tokio::spawn(async move {
            let started = std::time::Instant::now();
            // Everything before `since` in memory before the snapshot is read ([`Appends`]).
            let since = journal.stats().len.load(Ordering::Acquire);
            appends.drain().await;
            // The references are taken on the compaction's own thread, at its lower priority, a
            // shard at a time between its paced pieces ([`write_snapshot`]): taking them all at
            // once cost a core for a tenth of a second with a million leases (a cache miss per
            // lease), unpaced, and the exchanges queued behind it (row 11a, the first tenth of
            // each window).
            let source: SnapshotSource = Box::new(move |sink| write_snapshot(&memory, sink));
            match journal.compact_from(source, Some(since)).await {
                Ok(c) => {
                    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    tracing::info!(
                        records = c.records,
                        bytes = c.len,
                        millis,
                        pause_micros = c.pause_micros,
                        copied_in_pause = c.copied_in_pause,
                        "journal compacted"
                    );
                    compacted.fetch_add(c.records, Ordering::Relaxed);
                    totals.add(&c);
                }
                Err(e) => {
                    tracing::error!(error = %e, "journal compaction failed; appends continue on the old journal");
                }
            }
        }));
        finished
    }

    /// Waits for a running compaction, if any (flush, shutdown, tests).
    async fn settle(&self) {
        let task = self.compaction.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Writes every remembered lease and guarded `jti` into a compaction's file, in pieces of about
/// 256 KiB (the sink paces them). The leases are references taken from memory a shard at a time
/// ([`Memory::leases_of_shard`], about a thousand), and so are the `jti`s
/// ([`Memory::jtis_of_shard`]), so no map lock is held while one is encoded
/// or a piece written (a write can wait on the disk), and taking them is spread over the pieces;
/// each is let go as soon as it is encoded, so a lease changed meanwhile is copied once at
/// most. A lease added to a shard after it was taken is missed, one changed after it is written
/// as it was, and one added before is written even when its record came after the snapshot's
/// start: the records carried over cover the first two, and applying a known lease's `Created`
/// again changes nothing ([`Appends`]).
fn write_snapshot(memory: &Memory, sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<usize> {
    const PIECE: usize = 256 * 1024;
    let mut encoder = SnapshotEncoder::default();
    let mut out = Vec::with_capacity(PIECE + 64 * 1024);
    let mut records = 0;
    // After each record: now and then offer the core, and hand over a full piece.
    let mut encoded = |out: &mut Vec<u8>| -> std::io::Result<()> {
        records += 1;
        make_way(records);
        if out.len() >= PIECE {
            sink(out)?;
            out.clear();
        }
        Ok(())
    };
    for shard in 0..SHARDS {
        for lease in memory.leases_of_shard(shard) {
            encoder.encode_lease(&lease, &mut out);
            encoded(&mut out)?;
        }
    }
    for shard in 0..SHARDS {
        for used in memory.jtis_of_shard(shard) {
            encoder.encode(&[Event::JtiUsed { key: used.key.to_string(), exp: used.exp }], &mut out);
            encoded(&mut out)?;
        }
    }
    sink(&out)?;
    Ok(records)
}

/// Records a compaction encodes between two offers of its core ([`make_way`]): about 50 µs of
/// work.
const MAKE_WAY_EVERY: usize = 32;

/// Every [`MAKE_WAY_EVERY`] records, lets any thread waiting for the compaction's core run
/// first (`sched_yield`; it returns at once when none waits). The thread's lower priority alone
/// did not do that: a scheduler trace of row 11a's 1M windows (docs/benchmarks.md) caught the
/// journal's writer, woken onto the compaction's core, waiting 4.4 ms (a scheduler tick) behind
/// it while the other core sat idle, and every exchange of that group commit with it.
fn make_way(records: usize) {
    if records.is_multiple_of(MAKE_WAY_EVERY) {
        std::thread::yield_now();
    }
}

/// The journal record of a revocation's start.
fn revoke_requested(id: &str, reason: &str, at: UnixSeconds) -> Event {
    Event::RevokeRequested { id: id.to_string(), reason: reason.to_string(), at }
}

impl LeaseStore for FileStore {
    fn replay_seen<'a>(&'a self, key: &'a ReplayKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.memory.jti_seen(key.key())) })
    }

    fn issue<'a>(&'a self, lease: Lease, replay: Option<&'a ReplayKey>) -> BoxFuture<'a, Result<(), IssueError>> {
        Box::pin(self.issue_now(lease, replay))
    }

    fn begin_revoke<'a>(
        &'a self,
        id: &'a str,
        reason: &'a str,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Option<RevokeWork>, StoreError>> {
        Box::pin(async move { Ok(self.begin_now(id, reason, now).await) })
    }

    fn finish_revoke<'a>(
        &'a self,
        id: &'a str,
        error: Option<String>,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Option<LeaseState>, StoreError>> {
        Box::pin(self.finish_now(id, error, now))
    }

    fn claim_due<'a>(
        &'a self,
        now: UnixSeconds,
        quiet: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, Result<Due, StoreError>> {
        Box::pin(async move { Ok(self.claim_due_now(now, quiet).await) })
    }

    fn claim_all_pending(&self, now: UnixSeconds) -> BoxFuture<'_, Result<Vec<RevokeWork>, StoreError>> {
        Box::pin(async move { Ok(self.memory.claim_all_pending(now)) })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Lease>, StoreError>> {
        Box::pin(async move { Ok(self.memory.get(id)) })
    }

    fn list<'a>(&'a self, filter: &'a LeaseFilter, limit: usize) -> BoxFuture<'a, Result<Vec<Lease>, StoreError>> {
        Box::pin(async move { Ok(self.memory.list(filter, limit)) })
    }

    fn live_of_job<'a>(&'a self, job: &'a str, now: UnixSeconds) -> BoxFuture<'a, Result<Vec<Arc<str>>, StoreError>> {
        Box::pin(async move { Ok(self.memory.live_of_job(job, now)) })
    }

    fn live_leases<'a>(
        &'a self,
        policies: Option<&'a BTreeSet<String>>,
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<Vec<LiveLease>, StoreError>> {
        Box::pin(async move { Ok(self.memory.live_leases(policies, now)) })
    }

    fn handles_of<'a>(
        &'a self,
        backends: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, Result<Vec<RevokeHandle>, StoreError>> {
        Box::pin(async move { Ok(self.memory.handles_of(backends)) })
    }

    fn ended_handles_of<'a>(
        &'a self,
        backends: &'a BTreeSet<String>,
    ) -> BoxFuture<'a, Result<Vec<RevokeHandle>, StoreError>> {
        Box::pin(async move { Ok(self.memory.ended_handles_of(backends)) })
    }

    fn counts(&self) -> BoxFuture<'_, Result<Counts, StoreError>> {
        Box::pin(async move { Ok(self.counts_now()) })
    }

    fn renew<'a>(
        &'a self,
        id: &'a str,
        credentials: &'a [LeaseCredential],
        now: UnixSeconds,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.renew_now(id, credentials, now))
    }

    fn export(&self) -> BoxFuture<'_, Result<Vec<Event>, StoreError>> {
        Box::pin(async { Ok(self.memory.snapshot()) })
    }

    fn import<'a>(&'a self, records: &'a [Event]) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(self.import_now(records))
    }

    fn maintain(&self, now: UnixSeconds) -> BoxFuture<'_, Result<Maintained, StoreError>> {
        Box::pin(async move { Ok(self.maintain_now(now).await) })
    }

    fn health(&self) -> Health {
        match &self.journal {
            Some(j) if j.stats().broken.load(Ordering::Acquire) => Health::Broken,
            _ => Health::Open,
        }
    }

    fn compactions(&self) -> Option<CompactionStats> {
        let journal = self.journal.as_ref()?;
        let t = &self.totals;
        let running = self.compaction.lock().unwrap_or_else(PoisonError::into_inner);
        Some(CompactionStats {
            compactions: t.compactions.load(Ordering::Relaxed),
            running: running.as_ref().is_some_and(|task| !task.is_finished()),
            cpu_seconds: t.cpu_micros.load(Ordering::Relaxed) as f64 / 1e6,
            pause_max_seconds: t.pause_max_micros.load(Ordering::Relaxed) as f64 / 1e6,
            last_records: t.last_records.load(Ordering::Relaxed),
            last_snapshot_bytes: journal.stats().snapshot_bytes.load(Ordering::Relaxed),
            appended_bytes: journal.stats().appended_bytes.load(Ordering::Relaxed),
            fsyncs: journal.stats().fsyncs.load(Ordering::Relaxed),
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.settle().await;
            match &self.journal {
                Some(j) => j.flush().await.map_err(|e| StoreError(e.0)),
                None => Ok(()),
            }
        })
    }
}

/// An import carries leases and replay keys only: a record of a lease's later life (a revoke
/// started, an outcome) belongs to the store that wrote it, and its effect is in the lease's
/// exported state already.
pub(super) fn check_importable(records: &[Event]) -> Result<(), StoreError> {
    if records.iter().all(|e| matches!(e, Event::Created { .. } | Event::JtiUsed { .. })) {
        Ok(())
    } else {
        Err(StoreError("ledger import: only lease and replay-key records (`created`, `jti_used`) are imported".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Waker};

    #[tokio::test]
    async fn a_compaction_waits_for_appends_that_entered_before_it_and_only_those() {
        let appends = Appends::default();
        let early = appends.enter(); // its record may be durable, its effect not in memory yet
        let mut drain = std::pin::pin!(appends.drain());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(drain.as_mut().poll(&mut cx).is_pending(), "the snapshot would miss the early append's effect");
        let late = appends.enter(); // after the flip: its record lands after `since`, carried over
        assert!(drain.as_mut().poll(&mut cx).is_pending());
        drop(early);
        drain.await; // returns although `late` is still in flight
        drop(late);
        assert_eq!(appends.in_flight.iter().map(|n| n.load(Ordering::SeqCst)).sum::<usize>(), 0);
    }
}
