//! audit: one JSON line per exchange, denial, revocation and reload, on its own sink (a file).
//!
//! The sink fails closed for issuing: when an exchange's event cannot be written, the exchange
//! fails with 503 and whatever it minted is revoked (Vault does the same with its audit devices).
//! Ending a lease never waits on the audit sink: a revocation that could not be audited is still a
//! revocation, and its failure to audit is logged.
//!
//! Events carry fingerprints (SHA-256) of secrets, never a secret, and only the claims named in
//! the configured allowlist.
//!
//! **One writer thread.** A slow or stuck sink (NFS, a stalled log volume, a full pipe) must not
//! stop a tokio worker thread, and every request on it, inside `write(2)`. So the file is written
//! by a thread of its own, fed by a bounded queue: a caller serialises its event (no I/O), queues
//! the line and awaits the outcome; a full queue makes callers wait (asynchronously) instead of
//! growing memory without limit. Lines queued together are written with one `write(2)` of whole
//! lines on a file opened with `O_APPEND`, so concurrent brokers or a log shipper never see
//! interleaved lines. `reopen()` (on SIGHUP) follows a logrotate rename; it goes through the same
//! queue, so every event queued before it lands in the old file and every one after in the new.
//! The thread ends when the [`Audit`] is dropped, once it has answered what was queued.

use crate::claims::Claims;
use crate::config::AuditConfig;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Lines (and reopens) that may wait for the writer; beyond that, callers wait to queue.
const QUEUE: usize = 1024;
/// How many queued lines one `write(2)` may carry.
const MAX_BATCH: usize = 256;

pub struct Audit {
    sink: Option<Sink>,
    claims: Vec<String>,
    /// `{"replica":"<id>",`: every line starts by naming the replica that wrote it, so the
    /// lines of several replicas can be merged and still told apart. Empty: not named.
    replica: Vec<u8>,
    /// Events that could not be written (a metric). Counted by the writer thread.
    pub failures: Arc<AtomicU64>,
}

struct Sink {
    path: PathBuf,
    tx: mpsc::Sender<Command>,
}

/// Where the writer answers a command.
type Done = oneshot::Sender<Result<(), String>>;

enum Command {
    /// One serialised event, ending in a newline.
    Write { line: Vec<u8>, done: Done },
    /// Reopen the sink at its path (after logrotate moved it away).
    Reopen { done: Done },
}

/// The writer thread's sink: where lines go, and how to get a fresh one on reopen.
type Out = Box<dyn Write + Send>;
type Opener = Box<dyn FnMut() -> Result<Out, String> + Send>;

impl Audit {
    /// No sink: events are dropped (the server warns at start). No thread.
    pub fn disabled() -> Audit {
        Audit { sink: None, claims: Vec::new(), replica: Vec::new(), failures: Arc::new(AtomicU64::new(0)) }
    }

    /// Opens (creating, mode 0600) the configured file for appending, and starts its writer.
    /// Every line names `replica`.
    pub fn open(config: &AuditConfig, replica: &str) -> Result<Audit, String> {
        let out: Out = Box::new(open_append(&config.file)?);
        let path = config.file.clone();
        let reopen_path = path.clone();
        let opener: Opener = Box::new(move || open_append(&reopen_path).map(|f| Box::new(f) as Out));
        let mut audit = Audit::start(path, out, opener, config.claims.clone())?;
        let name = serde_json::to_string(replica).map_err(|e| e.to_string())?;
        audit.replica = format!("{{\"replica\":{name},").into_bytes();
        Ok(audit)
    }

    /// An audit writing to `out` (a test's fake sink); it cannot be reopened.
    #[cfg(test)]
    pub(crate) fn with_writer(out: Out) -> Audit {
        let opener: Opener = Box::new(|| Err("this sink cannot be reopened".into()));
        #[allow(clippy::expect_used)] // test-only constructor: a thread that cannot start fails the test
        Audit::start(PathBuf::from("<test sink>"), out, opener, Vec::new()).expect("audit writer thread")
    }

    fn start(path: PathBuf, out: Out, opener: Opener, claims: Vec<String>) -> Result<Audit, String> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let failures = Arc::new(AtomicU64::new(0));
        let (writer_path, writer_failures) = (path.clone(), failures.clone());
        std::thread::Builder::new()
            .name("ephemera-audit".into())
            .spawn(move || writer(out, opener, &writer_path, rx, &writer_failures))
            .map_err(|e| format!("cannot start the audit writer thread: {e}"))?;
        Ok(Audit { sink: Some(Sink { path, tx }), claims, replica: Vec::new(), failures })
    }

    /// The file events go to, when there is one.
    pub fn path(&self) -> Option<&Path> {
        self.sink.as_ref().map(|s| s.path.as_path())
    }

    pub fn is_enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// The allowlisted claims of a claim set, serialised straight from it (no copy): the
    /// exchange's hot path.
    pub fn selected<'a>(&'a self, claims: &'a Claims) -> Selected<'a> {
        Selected { names: &self.claims, claims }
    }

    /// Writes one event as one line: serialised here, written by the writer thread, awaited.
    /// `Err` when the sink cannot take it (the caller decides whether that fails the request);
    /// always `Ok` without a sink.
    pub async fn write(&self, event: &impl serde::Serialize) -> Result<(), String> {
        let Some(sink) = &self.sink else { return Ok(()) };
        let mut line = serde_json::to_vec(event).map_err(|e| e.to_string())?;
        self.name_replica(&mut line);
        line.push(b'\n');
        sink.ask(|done| Command::Write { line, done }).await
    }

    /// `{"a":1}` → `{"replica":"r1","a":1}` (and `{}` → `{"replica":"r1"}`).
    fn name_replica(&self, line: &mut Vec<u8>) {
        if self.replica.is_empty() || line.first() != Some(&b'{') {
            return;
        }
        let prefix = if line.len() == 2 {
            // `{}`: the replica is the only member, so no comma after it.
            &self.replica[..self.replica.len() - 1]
        } else {
            &self.replica[..]
        };
        line.splice(0..1, prefix.iter().copied());
    }

    /// Reopens the file at its path (after logrotate moved it away), after every event queued
    /// before it is written. On `Err` the old file stays in use.
    pub async fn reopen(&self) -> Result<(), String> {
        let Some(sink) = &self.sink else { return Ok(()) };
        sink.ask(|done| Command::Reopen { done }).await
    }
}

impl Sink {
    /// Queues a command (waiting while the queue is full) and awaits the writer's answer.
    async fn ask(&self, command: impl FnOnce(Done) -> Command) -> Result<(), String> {
        let stopped = || format!("audit file {}: the audit writer stopped", self.path.display());
        let (done, answer) = oneshot::channel();
        self.tx.send(command(done)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The writer thread: takes every queued line (up to [`MAX_BATCH`]), writes them with one
/// `write_all`, answers each; a reopen is done in its place in the queue. Ends when the
/// [`Audit`] (the only sender) is dropped.
fn writer(mut out: Out, mut opener: Opener, path: &Path, mut rx: mpsc::Receiver<Command>, failures: &AtomicU64) {
    let mut batch = Vec::new();
    let mut waiting = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let (mut next, mut reopen) = (Some(first), None);
        while let Some(command) = next.take() {
            match command {
                Command::Write { line, done } => {
                    batch.extend_from_slice(&line);
                    waiting.push(done);
                    if waiting.len() < MAX_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                // Ends the batch: the lines before it go to the old file.
                Command::Reopen { done } => reopen = Some(done),
            }
        }
        if !waiting.is_empty() {
            let result = write_lines(&mut *out, &batch, path);
            if result.is_err() {
                failures.fetch_add(waiting.len() as u64, Ordering::Relaxed);
            }
            for done in waiting.drain(..) {
                let _ = done.send(result.clone());
            }
            batch.clear();
        }
        if let Some(done) = reopen {
            let _ = done.send(opener().map(|fresh| out = fresh));
        }
    }
}

/// One `write_all` of whole lines: with O_APPEND they land at the end in one piece. A short write
/// (a full disk) leaves a partial line; the next event starts on a new line only if we say so, so
/// a failed write is followed by a newline attempt. Every line of a failed write counts as not
/// written, even one that may have landed before the failure: failing closed.
fn write_lines(out: &mut dyn Write, lines: &[u8], path: &Path) -> Result<(), String> {
    match out.write_all(lines).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = out.write_all(b"\n");
            Err(format!("audit file {}: {e}", path.display()))
        }
    }
}

fn open_append(path: &Path) -> Result<File, String> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The trail says who got what: not for every local user to read.
        options.mode(0o600);
    }
    options.open(path).map_err(|e| format!("cannot open the audit file {}: {e}", path.display()))
}

/// What [`events_of_lease`] found.
#[derive(Debug, serde::Serialize)]
pub struct Found {
    /// The events naming the lease, oldest first (at most `max_events`, the latest ones).
    pub events: Vec<serde_json::Value>,
    /// Bytes of the file read (its end).
    pub scanned_bytes: u64,
    /// Was the whole file read? When not, older events of the lease may be in the part skipped.
    pub complete: bool,
}

/// The audit events of one lease (its exchange, renewals and revocation), read back from the end
/// of the audit file: at most its last `max_bytes`, at most `max_events` events. For the
/// console's lease page; a rotated file is not read. `lease_id` must already be a lease id: it is
/// matched as the JSON member `"lease_id":"…"` the events write.
pub fn events_of_lease(path: &Path, lease_id: &str, max_bytes: u64, max_events: usize) -> Result<Found, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path).map_err(|e| format!("audit file {}: {e}", path.display()))?;
    let len = file.metadata().map_err(|e| format!("audit file {}: {e}", path.display()))?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start)).map_err(|e| format!("audit file {}: {e}", path.display()))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    file.take(len - start).read_to_end(&mut bytes).map_err(|e| format!("audit file {}: {e}", path.display()))?;
    let needle = format!("\"lease_id\":\"{lease_id}\"");
    let mut lines = bytes.split(|b| *b == b'\n');
    if start > 0 {
        lines.next(); // begun mid-line
    }
    let mut events: Vec<serde_json::Value> = lines
        .filter(|line| line.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect();
    let skip = events.len().saturating_sub(max_events);
    events.drain(..skip);
    Ok(Found { events, scanned_bytes: len - start, complete: start == 0 })
}

/// [`Audit::selected`]: a map of the allowlisted claims that the claim set carries.
pub struct Selected<'a> {
    names: &'a [String],
    claims: &'a Claims,
}

impl serde::Serialize for Selected<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for name in self.names {
            if let Some(value) = self.claims.get(name) {
                map.serialize_entry(name, value)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// A sink whose `write` blocks until its gate opens: a fake, because a real disk (or NFS, or a
    /// stalled log volume) cannot be made slow on cue. It says when a write has entered it.
    struct GatedSink {
        entered: Option<tokio::sync::oneshot::Sender<()>>,
        gate: std::sync::mpsc::Receiver<()>,
    }

    impl Write for GatedSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(entered) = self.entered.take() {
                let _ = entered.send(());
            }
            let _ = self.gate.recv(); // blocks until the gate opens (or its sender is gone)
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_audit_sink_does_not_stall_other_tasks_on_the_runtime_thread() {
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let (open_gate, gate) = std::sync::mpsc::channel();
        let audit = Arc::new(Audit::with_writer(Box::new(GatedSink { entered: Some(entered_tx), gate })));

        // The deadlock breaker, not a timer the test relies on: it opens the gate as soon as the
        // other task reports in, or after 10 s if it never does (the runtime's one thread is
        // stuck inside the sink), so a regression fails instead of hanging.
        let gate_opened = Arc::new(AtomicBool::new(false));
        let (reported, report) = std::sync::mpsc::channel::<()>();
        let breaker = std::thread::spawn({
            let gate_opened = gate_opened.clone();
            move || {
                let on_time = report.recv_timeout(Duration::from_secs(10)).is_ok();
                gate_opened.store(true, Ordering::SeqCst);
                let _ = open_gate.send(());
                on_time
            }
        });

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (written, ran_while_blocked) = runtime.block_on(async {
            let writing = tokio::spawn({
                let audit = audit.clone();
                async move { audit.write(&serde_json::json!({"event": "exchange"})).await }
            });
            let other = tokio::spawn(async move {
                // The sink is now blocked inside a write: does this task still get to run?
                let _ = entered.await;
                let ran_while_blocked = !gate_opened.load(Ordering::SeqCst);
                let _ = reported.send(());
                ran_while_blocked
            });
            (writing.await.unwrap(), other.await.unwrap())
        });

        assert!(ran_while_blocked, "another task ran only after the stuck sink's gate was opened");
        assert!(breaker.join().unwrap(), "the deadlock breaker had to open the gate");
        assert_eq!(written, Ok(()));
    }

    /// A sink that refuses every line (like a full disk) and records what it was asked to write.
    struct FullSink(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl Write for FullSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Err(std::io::Error::other("no space left"))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_event_of_a_failed_write_is_an_error_and_a_failure_and_a_newline_is_attempted() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let audit = Audit::with_writer(Box::new(FullSink(asked.clone())));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let results = runtime.block_on(async {
            let events = [1, 2, 3].map(|n| serde_json::json!({ "n": n }));
            let (a, b, c) = tokio::join!(audit.write(&events[0]), audit.write(&events[1]), audit.write(&events[2]));
            [a, b, c]
        });
        for result in &results {
            assert!(
                result.as_ref().is_err_and(|e| e.contains("audit file") && e.contains("no space left")),
                "{result:?}"
            );
        }
        assert_eq!(audit.failures.load(Ordering::Relaxed), 3);
        let asked = asked.lock().unwrap();
        // However the writer batched them: each failed write of lines is followed by a newline.
        assert!(asked.len() >= 2 && asked.len() % 2 == 0, "{asked:?}");
        for pair in asked.chunks(2) {
            assert!(pair[0].ends_with(b"}\n") && pair[1] == b"\n", "{asked:?}");
        }
    }

    /// Says when it is dropped: the writer thread owns it until it ends.
    struct DropSignal(std::sync::mpsc::Sender<()>);

    impl Write for DropSignal {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for DropSignal {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    #[test]
    fn dropping_the_audit_ends_its_writer_thread() {
        let (dropped, sink_dropped) = std::sync::mpsc::channel();
        let audit = Audit::with_writer(Box::new(DropSignal(dropped)));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(runtime.block_on(audit.write(&"event")), Ok(()));
        drop(audit);
        // A deadlock breaker, not a wait the test relies on: the sink is dropped when the thread ends.
        assert!(sink_dropped.recv_timeout(Duration::from_secs(10)).is_ok(), "the writer thread outlived its Audit");
    }

    #[test]
    fn disabled_audit_drops_events_and_reopens_without_a_thread() {
        let audit = Audit::disabled();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(runtime.block_on(audit.write(&"event")), Ok(()));
        assert_eq!(runtime.block_on(audit.reopen()), Ok(()));
        assert!(!audit.is_enabled() && audit.path().is_none());
    }

    #[test]
    fn a_reopen_is_ordered_with_the_writes_queued_around_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let audit = Audit::open(&AuditConfig { file: file.clone(), claims: Vec::new() }, "r1").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            assert_eq!(audit.write(&"first").await, Ok(()));
            std::fs::rename(&file, dir.path().join("audit.jsonl.1")).unwrap();
            // Queued in this order, without waiting for each other: before, reopen, after.
            let (before, reopened, after) = tokio::join!(audit.write(&"before"), audit.reopen(), audit.write(&"after"));
            assert_eq!((before, reopened, after), (Ok(()), Ok(()), Ok(())));
        });
        let rotated = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        assert_eq!(rotated, "\"first\"\n\"before\"\n");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "\"after\"\n");
    }

    #[test]
    fn every_line_names_the_replica_that_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let audit = Audit::open(&AuditConfig { file: file.clone(), claims: Vec::new() }, "replica-2").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            audit.write(&serde_json::json!({"event": "issued", "lease_id": "lse_1"})).await.unwrap();
            audit.write(&serde_json::json!({})).await.unwrap();
        });
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0], serde_json::json!({"replica": "replica-2", "event": "issued", "lease_id": "lse_1"}));
        assert_eq!(lines[1], serde_json::json!({"replica": "replica-2"}));
    }

    #[test]
    fn the_events_of_a_lease_are_read_back_from_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let mut text = String::new();
        for i in 0..50 {
            text.push_str(&format!("{{\"event\":\"exchange\",\"lease_id\":\"lse_A\",\"n\":{i}}}\n"));
            text.push_str(&format!("{{\"event\":\"exchange\",\"lease_id\":\"lse_AB\",\"n\":{i}}}\n"));
        }
        text.push_str("{\"event\":\"revocation\",\"lease_id\":\"lse_A\",\"outcome\":\"revoked\"}\n");
        std::fs::write(&file, &text).unwrap();
        let all = events_of_lease(&file, "lse_A", 1 << 20, 1000).unwrap();
        assert_eq!((all.events.len(), all.complete), (51, true), "lse_AB is another lease");
        assert_eq!(all.events[50]["event"], "revocation", "oldest first, the latest last");
        let latest = events_of_lease(&file, "lse_A", 1 << 20, 3).unwrap();
        assert_eq!(latest.events.iter().map(|e| e["n"].as_i64()).collect::<Vec<_>>(), [Some(48), Some(49), None]);
        // Reading only the end: the line it starts inside is skipped, not misparsed.
        let tail = events_of_lease(&file, "lse_A", 100, 1000).unwrap();
        assert!(!tail.complete && tail.scanned_bytes == 100);
        assert_eq!(tail.events.len(), 1, "{:?}", tail.events);
    }
}
