//! Row 3, the ledger. Runs in a child process of its own, so its memory figures start from a
//! clean heap and its gigabytes go back when it exits.
//!
//! Every lease is shaped like one the broker records: a ULID id, a GitHub job key, one broker-JWT
//! credential with its revoke handle, and the verified claims of a GitHub-shaped token (each
//! lease its own copy, with its own `jti`, `run_id` and `check_run_id`). The replayed journal is
//! the largest a broker holding that many leases starts from: a compaction's snapshot and two
//! compaction intervals of appends (see [`write_journal`]). Leases are built from the journal records' JSON
//! form, which the journal keeps readable across versions, so the bench does not depend on the
//! ledger's in-memory layout.
//!
//! Memory and replay are measured on the real binary (`ephemera serve` on a data directory
//! holding the journal): its RSS and its time to `/readyz` are what an operator sees.
//! Revoke-by-job, reaping and group commit are measured in process, on `FileStore` and `Journal`.

use crate::broker::{Broker, Setup};
use crate::table::{Row, median};
use ephemera::claims::Claims;
use ephemera::identity::ReplayKey;
use ephemera::ledger::journal::{FileStorage, Journal, SnapshotEncoder, encode};
use ephemera::ledger::{Event, FileStore, FileStoreOptions, Lease, LeaseStore, NO_QUIET_BACKENDS};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const ROUNDS: usize = 10;
const PER_ROUND: usize = 100;
/// Leases 0..TARGETS are the ones revoked and reaped in both ledgers: the first half due for
/// expiry (at `due + i % ROUNDS`), the second half revoked by job.
const TARGETS: usize = 2 * ROUNDS * PER_ROUND;
const SMALL_OTHERS: usize = 1_000;

/// Makes leases at `now` (the real time: the binary replays them with its real clock, and they
/// must still be live then).
pub struct Leases {
    base: Claims,
    now: i64,
    due: i64,
}

impl Leases {
    pub fn new() -> Leases {
        let now = ephemera::clock::Clock::now(&ephemera::clock::SystemClock);
        Leases { base: crate::tokens::fixture_claims(), now, due: now + 1_800 }
    }

    /// Lease `i`'s two records as JSON, as its exchange journals them: `JtiUsed` and `Created`.
    fn records(&self, i: usize) -> (Value, Value) {
        let (run_id, check_run_id) = crate::tokens::job_ids(i as u64);
        let mut claims = self.base.clone();
        let jti = ephemera::ids::b64url(&ephemera::ids::random::<16>());
        for (k, v) in [
            ("jti", json!(jti)),
            ("run_id", json!(run_id.to_string())),
            ("check_run_id", json!(check_run_id.to_string())),
            ("iat", json!(self.now - 300)),
            ("nbf", json!(self.now - 300)),
            ("exp", json!(self.now)),
        ] {
            claims.insert(k.into(), v);
        }
        let expires_at = if i < TARGETS / 2 { self.due + (i % ROUNDS) as i64 } else { self.now + 3_600 };
        let lease = json!({
            "id": ephemera::ids::lease_id(self.now), "job": job(i), "policy": "bench", "issuer": "github",
            "created_at": self.now, "expires_at": expires_at, "state": "active",
            "credentials": [{"name": "api", "kind": "jwt", "revocation": "immediate",
                             "handle": {"backend": "jwt", "data": {"jti": ephemera::ids::jwt_id()}}}],
            "claims": claims,
        });
        let key = ephemera::secret::sha256_hex(format!("github\0bench\0{jti}").as_bytes());
        (json!({"t": "jti_used", "key": key, "exp": self.now + 30}), lease)
    }

    /// Lease `i`'s `Created` record, as compaction writes it (`FileStore`'s compaction snapshot: every lease
    /// in its current state, plus the `jti`s of tokens still valid; after a restart those have
    /// long expired, so there are none).
    fn created(&self, i: usize) -> Event {
        serde_json::from_value(json!({"t": "created", "lease": self.records(i).1})).unwrap()
    }

    /// Lease `i` and its `jti` key, for `LeaseStore::issue`.
    fn lease(&self, i: usize) -> (Lease, String) {
        let (jti, lease) = self.records(i);
        (serde_json::from_value(lease).unwrap(), jti["key"].as_str().unwrap_or_default().to_string())
    }
}

fn job(i: usize) -> String {
    let (run_id, check_run_id) = crate::tokens::job_ids(i as u64);
    format!("github:{}:{run_id}:{}:{check_run_id}", crate::tokens::REPOSITORY_ID, crate::tokens::RUN_ATTEMPT)
}

/// The child process: every ledger row for `n` leases (plus the 2,000 the in-process rows act
/// on), with `records` durable appends, and the broker `binary` for memory and replay. Works in
/// `keep` (kept) when given, else in a temporary directory.
pub async fn run(n: usize, records: usize, binary: &Path, keep: Option<&Path>) -> Vec<Row> {
    let temp = tempfile::tempdir().unwrap();
    let dir = keep.unwrap_or(temp.path());
    std::fs::create_dir_all(dir).unwrap();
    let leases = Leases::new();
    let total = TARGETS + n;
    let scale = if n >= 1_000_000 { format!("{}M", n / 1_000_000) } else { format!("{}k", n / 1_000) };

    // The journal of `total` exchanges; the same leases applied to an in-process ledger.
    let path = dir.join("journal");
    let started = Instant::now();
    let big = FileStore::in_memory(FileStoreOptions::default());
    let rss_before = crate::procfs::rss_bytes();
    // One compaction interval of appends: `compact_ratio` (0.5) of the snapshot, at least
    // `compact_bytes` (64 MiB at 1M leases, scaled with the lease count).
    let tail = Tail { of_snapshot: 0.5, at_least: 64 * 1024 * 1024 * total as u64 / 1_000_000 };
    let journal_bytes = write_journal(&path, total, &leases, tail, |event| big.apply(event));
    let in_process_rss = crate::procfs::rss_bytes().saturating_sub(rss_before) / total as u64;
    eprintln!("  wrote and applied {total} leases in {:.1} s", started.elapsed().as_secs_f64());
    // 1k others, and a tenth of `n` (to tell a scan, which grows from there too, from cache
    // misses, which stop growing once the maps outgrow the caches).
    let small = FileStore::in_memory(FileStoreOptions::default());
    write_journal(&dir.join("small"), TARGETS + SMALL_OTHERS, &leases, Tail::NONE, |event| small.apply(event));
    let mid = FileStore::in_memory(FileStoreOptions::default());
    write_journal(&dir.join("mid"), TARGETS + n / 10, &leases, Tail::NONE, |event| mid.apply(event));
    let [small_cost, mid_cost, big_cost] = revoke_and_reap([&small, &mid, &big], &leases).await;
    let mid_scale = if n >= 10_000_000 { format!("{}M", n / 10_000_000) } else { format!("{}k", n / 10_000) };
    // Rows 3b and 3c: the cost of one operation with 1k, a tenth of `n` and `n` other leases.
    let scaling = |id: &str, what: &str, per: &str, [small, mid, big]: [f64; 3]| {
        Row::new(
            id,
            &format!("{what}, 1k vs {scale} other leases"),
            format!("{:.2} µs per {per} with {scale}", big * 1e6),
            format!(
                "{:.2} µs with 1k ({:.2} µs with {mid_scale}: {mid_scale} → {scale} ×{:.2})",
                small * 1e6,
                mid * 1e6,
                big / mid
            ),
        )
        .ratio(big / small)
        .goal("≈ 1 (≤ 2: no scan)", big / small <= 2.0)
    };
    drop(big);
    drop(mid);
    drop(small);

    let floor_secs = read_and_crc(&path).min(read_and_crc(&path));
    let boot = boot_binary(binary, dir, &path).await;
    let [first, second] = boot.ready_full;
    let replay_secs = first.min(second) - boot.ready_empty;
    let rss_per_lease = boot.rss_full.saturating_sub(boot.rss_empty) / total as u64;
    eprintln!(
        "  the broker replayed {total} leases: ready after {first:.2} s, then {second:.2} s (empty: {:.2} s)",
        boot.ready_empty
    );
    let (durable, single) = durable_rate(dir, records, &leases).await;

    let record_bytes = journal_bytes / total as u64;
    let replay_goal = 2.0 * total as f64 / 1e6;
    vec![
        Row::new(
            "3a",
            &format!("RSS per live lease, broker process after replaying {scale} leases (claims snapshot included)"),
            format!(
                "{rss_per_lease} B ({:.2} GB more than with an empty journal)",
                boot.rss_full.saturating_sub(boot.rss_empty) as f64 / 1e9
            ),
            format!("in-process `FileStore` alone: {in_process_rss} B per lease; journal: {record_bytes} B per lease"),
        )
        .ratio(rss_per_lease as f64 / in_process_rss as f64)
        .goal("≤ 1 KiB", rss_per_lease <= 1024),
        scaling("3b", "revoke-by-job (lookup, begin + finish revoke)", "job", [small_cost.0, mid_cost.0, big_cost.0]),
        scaling("3c", "reaping (due expiries, begin + finish revoke)", "due lease", [small_cost.1, mid_cost.1, big_cost.1]),
        Row::new(
            "3d",
            &format!("journal replay of {scale} leases: broker's time to /readyz, less its time with an empty journal"),
            format!(
                "{replay_secs:.2} s ({:.1} µs per lease; the faster of two boots, ready after {first:.2} s and {second:.2} s)",
                replay_secs / total as f64 * 1e6,
            ),
            format!("{floor_secs:.2} s to read + CRC the same {:.0} MB (faster of two)", journal_bytes as f64 / 1e6),
        )
        .ratio(replay_secs / floor_secs)
        .goal(&format!("≤ {replay_goal:.2} s (2 s per 1M)"), replay_secs <= replay_goal),
        Row::new(
            "3e",
            "durable leases/s, group commit (256 concurrent writers; JtiUsed + Created, fsync)",
            format!("{durable:.0}/s ({records} leases)"),
            format!("{single:.0}/s, one writer (an fsync each)"),
        )
        .ratio(durable / single)
        .goal("≥ 20k/s", durable >= 20_000.0),
    ]
}

/// A compacted journal of `count` live leases at `path` (rows 11: the broker's live set).
pub fn write_live_journal(path: &Path, count: usize) -> u64 {
    write_journal(path, count, &Leases::new(), Tail::NONE, |_| {})
}

/// How much of a journal comes as appends after its snapshot ([`write_journal`]).
#[derive(Clone, Copy)]
struct Tail {
    /// A share of the snapshot's bytes,
    of_snapshot: f64,
    /// and at least this many bytes.
    at_least: u64,
}

impl Tail {
    const NONE: Tail = Tail { of_snapshot: 0.0, at_least: 0 };
}

/// Writes a journal of `count` leases, handing every lease's `Created` event to `sink` once it
/// is encoded. Bytes written.
///
/// The journal a broker holding `count` leases starts from, at its largest: the broker compacts
/// once `ledger.compact_ratio` (0.5) of its last snapshot and at least `ledger.compact_bytes`
/// (64 MiB) were appended, and a compaction carries over only the records memory may not hold
/// yet (a group commit's worth), so it is a snapshot (one `Created` record per lease, with the
/// file's string dictionary, as `Journal::compact` writes it) followed by one compaction
/// interval of appends, `tail` of them: a `JtiUsed` and a self-contained `Created` per
/// exchange, as `Journal::append` writes them. (Not counted: what is appended while the next
/// compaction runs, which depends on the load. A journal that was never compacted is all
/// appends; replaying a million `JtiUsed` and forgetting them at resume cost about 0.3 KB of
/// RSS per lease more under glibc's malloc.)
fn write_journal(path: &Path, count: usize, leases: &Leases, tail: Tail, mut sink: impl FnMut(Event)) -> u64 {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    file.write_all(b"EPHJRNL1").unwrap();
    let mut written = 8u64;
    let mut bytes = Vec::new();
    let appended = |i: usize| -> [Event; 2] {
        let (jti, lease) = leases.records(i);
        [serde_json::from_value(jti).unwrap(), serde_json::from_value(json!({"t": "created", "lease": lease})).unwrap()]
    };
    encode(&appended(0), &mut bytes);
    let per_append = bytes.len() as u64;
    // A snapshot record once the dictionary holds the shared strings: the second lease's.
    bytes.clear();
    let mut probe = SnapshotEncoder::default();
    probe.encode(&[leases.created(0)], &mut bytes);
    let first = bytes.len();
    probe.encode(&[leases.created(1)], &mut bytes);
    let per_snapshot = (bytes.len() - first) as f64;
    let tail_bytes = ((tail.of_snapshot * per_snapshot * count as f64) as u64).max(tail.at_least);
    let tail = usize::try_from(tail_bytes / per_append).unwrap().min(count);
    bytes.clear();
    let mut encoder = SnapshotEncoder::default();
    for i in 0..count {
        let created = if i < count - tail {
            let created = leases.created(i);
            encoder.encode(std::slice::from_ref(&created), &mut bytes);
            created
        } else {
            let [jti, created] = appended(i);
            encode(&[jti, created.clone()], &mut bytes);
            created
        };
        sink(created);
        if bytes.len() >= 1 << 20 || i + 1 == count {
            file.write_all(&bytes).unwrap();
            written += bytes.len() as u64;
            bytes.clear();
        }
    }
    // On disk before anything is timed: write-back of a file this size competed with the
    // replay that followed.
    file.into_inner().unwrap().sync_all().unwrap();
    written
}

/// Per-operation seconds (median over rounds) for each ledger: (revoke-by-job, reaping). Rounds
/// go through the ledgers in turn, so a noisy moment hits them alike.
async fn revoke_and_reap<const N: usize>(ledgers: [&FileStore; N], leases: &Leases) -> [(f64, f64); N] {
    let mut samples = [(); N].map(|_| (Vec::new(), Vec::new()));
    let now = leases.now;
    for round in 0..ROUNDS {
        for (ledger, (revoke, reap)) in ledgers.iter().zip(samples.iter_mut()) {
            let first = TARGETS / 2 + round * PER_ROUND;
            let started = Instant::now();
            for i in first..first + PER_ROUND {
                for id in ledger.live_of_job(&job(i), now).await.unwrap() {
                    ledger.begin_revoke(&id, "job", now).await.unwrap().unwrap();
                    ledger.finish_revoke(&id, None, now).await.unwrap();
                }
            }
            revoke.push(started.elapsed().as_secs_f64() / PER_ROUND as f64);
            let at = leases.due + round as i64;
            let started = Instant::now();
            let due = ledger.claim_due(at, &NO_QUIET_BACKENDS).await.unwrap().expired;
            for work in &due {
                ledger.finish_revoke(&work.lease_id, None, at).await.unwrap();
            }
            reap.push(started.elapsed().as_secs_f64() / due.len().max(1) as f64);
            assert_eq!(due.len(), PER_ROUND, "the same leases are due in every ledger");
        }
    }
    samples.map(|(revoke, reap)| (median(&revoke), median(&reap)))
}

/// The replay floor: reading the journal and checking a CRC over all of it.
fn read_and_crc(path: &Path) -> f64 {
    let started = Instant::now();
    let bytes = std::fs::read(path).unwrap();
    std::hint::black_box(crc32fast::hash(&bytes));
    started.elapsed().as_secs_f64()
}

struct Boot {
    ready_empty: f64,
    /// Two boots in a row on the same journal.
    ready_full: [f64; 2],
    rss_empty: u64,
    rss_full: u64,
}

/// Starts the broker binary on an empty data directory, then twice on one holding `journal`
/// (moved into place): seconds from spawn to `/readyz` 200, and RSS once ready. Compaction is
/// switched off for both, so the figure is replay (and resume), not a rewrite of the journal.
async fn boot_binary(binary: &Path, dir: &Path, journal: &Path) -> Boot {
    const NO_COMPACTION: &str = "[ledger]\ncompact_bytes = 1000000000000\n";
    let (empty_dir, full_dir) = (dir.join("broker-empty"), dir.join("broker-full"));
    std::fs::create_dir_all(full_dir.join("data/ledger")).unwrap();
    std::fs::rename(journal, full_dir.join("data/ledger/journal")).unwrap();
    let started = Instant::now();
    let empty = Broker::start_with(binary, &empty_dir, &Setup::extra(NO_COMPACTION)).await;
    let ready_empty = started.elapsed().as_secs_f64();
    let rss_empty = crate::procfs::rss_of(&empty.pid.to_string());
    drop(empty);
    // Twice: the first boot after the bench wrote a journal this size has been up to twice as
    // slow on this shared machine (its read + CRC floor too), and a restarting broker reads a
    // journal it wrote itself, from the page cache.
    let mut ready_full = [0.0; 2];
    let mut rss_full = 0;
    for ready in &mut ready_full {
        let started = Instant::now();
        let full = Broker::start_with(binary, &full_dir, &Setup::extra(NO_COMPACTION)).await;
        *ready = started.elapsed().as_secs_f64();
        rss_full = crate::procfs::rss_of(&full.pid.to_string());
    }
    Boot { ready_empty, ready_full, rss_empty, rss_full }
}

/// Leases made durable per second: `records` exchanges' records from 256 concurrent writers
/// (group commit), and from one writer in sequence (one fsync each) as the baseline.
async fn durable_rate(dir: &Path, records: usize, leases: &Leases) -> (f64, f64) {
    let single_n = (records / 100).clamp(100, 500);
    let single = appends(&dir.join("journal-single"), 1, single_n, leases).await;
    let group = appends(&dir.join("journal-group"), 256, records, leases).await;
    (group, single)
}

/// Leases made durable per second by a `FileStore` on a new journal at `path` ([`issues`]).
pub async fn appends(path: &Path, writers: usize, total: usize, leases: &Leases) -> f64 {
    let (storage, opened) = FileStorage::open(path).unwrap();
    let journal = Journal::start(Box::new(storage), opened.len);
    issues(Arc::new(FileStore::with_journal(journal, FileStoreOptions::default())), writers, total, leases).await
}

/// Leases made durable per second by `ledger`: `total` calls of `LeaseStore::issue` (a lease and
/// its token's replay key), from `writers` concurrent tasks that each wait for their last.
pub async fn issues(ledger: Arc<dyn LeaseStore>, writers: usize, total: usize, leases: &Leases) -> f64 {
    let per_writer = total / writers;
    let batches: Vec<Vec<(Lease, String)>> =
        (0..writers).map(|w| (0..per_writer).map(|k| leases.lease(w * per_writer + k)).collect()).collect();
    let exp = leases.now + 330;
    let started = Instant::now();
    let tasks: Vec<_> = batches
        .into_iter()
        .map(|mine| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                for (lease, key) in mine {
                    ledger.issue(lease, Some(&ReplayKey::new(key, exp))).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (per_writer * writers) as f64 / started.elapsed().as_secs_f64()
}
