//! First figures for the lease ledger (issue 3), until `scripts/bench` exists (issue 7):
//!
//!     cargo run --release --example ledger_figures -- [LEASES]   # default 1000000
//!
//! Prints: durable records/s with group commit (and fsyncs), journal replay time and bytes,
//! RSS per live lease (claims snapshot included), and the cost of revoke-by-job and reaping with
//! 1k vs LEASES other leases (the ratio should be ≈ 1: neither may scan).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ephemera::identity::Claims;
use ephemera::ledger::journal::{FileStorage, Journal, encode};
use ephemera::ledger::{ClaimSnapshot, Event, Lease, LeaseCredential, LeaseState, Ledger, RetryPolicy, name};
use ephemera::mint::{Revocation, RevokeHandle};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

fn claims(i: usize) -> Claims {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/claims/github-environment-deploy.json");
    let mut c: Claims = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    c.insert("run_id".into(), json!(i.to_string()));
    c.insert("jti".into(), json!(format!("jti-{i}")));
    c
}

fn lease(i: usize, expires_at: i64) -> Lease {
    Lease {
        id: format!("lse_{i:026}").into(),
        job: format!("github:74:{i}:1:{i}").into(),
        policy: name::intern("deploy"),
        issuer: name::intern("github"),
        created_at: 0,
        expires_at,
        state: LeaseState::Active,
        reason: None,
        attempts: 0,
        next_attempt_at: 0,
        last_error: None,
        credentials: Box::new([LeaseCredential::new(
            "api",
            "jwt",
            Revocation::Immediate,
            &RevokeHandle { backend: "jwt".into(), data: json!({"jti": format!("jti_{i}")}) },
        )]),
        claims: ClaimSnapshot::new(&claims(i)),
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).map_or(1_000_000, |a| a.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    println!("ledger figures, {n} leases (GitHub-shaped claims snapshot each)");

    // 1. Durable records per second: 256 concurrent appenders, group commit.
    let path = dir.path().join("journal-commit");
    let (storage, opened) = FileStorage::open(&path).unwrap();
    let journal = Journal::start(Box::new(storage), opened.len);
    let ledger = Arc::new(Ledger::new(Some(journal.clone()), RetryPolicy::default()));
    let started = Instant::now();
    let per_task = 200;
    let tasks: Vec<_> = (0..256)
        .map(|t| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                for k in 0..per_task {
                    ledger.record_created(lease(t * per_task + k, 1_000), None).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let records = 256 * per_task;
    let fsyncs = journal.stats().fsyncs.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "durable records/s (group commit, 256 writers): {:.0}  ({records} records, {fsyncs} fsyncs, {:.1} records/fsync)",
        records as f64 / secs,
        records as f64 / fsyncs as f64
    );
    drop(ledger);

    // 2. Replay: a journal of n Created records.
    let path = dir.path().join("journal-replay");
    let mut bytes = b"EPHJRNL1".to_vec();
    let mut batch = Vec::new();
    for i in 0..n {
        batch.push(Event::Created { lease: Box::new(lease(i, 1_000 + (i % 3600) as i64)) });
        if batch.len() == 10_000 {
            encode(&batch, &mut bytes);
            batch.clear();
        }
    }
    encode(&batch, &mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    let journal_bytes = bytes.len();
    drop(bytes);
    let decode_started = Instant::now();
    let raw = std::fs::read(&path).unwrap();
    let read_secs = decode_started.elapsed().as_secs_f64();
    let mut decoded_events = 0usize;
    ephemera::ledger::journal::decode_with(&raw, |_| decoded_events += 1).unwrap();
    let decode_secs = decode_started.elapsed().as_secs_f64() - read_secs;
    drop(raw);
    println!("  (read {read_secs:.2} s, decode alone {decode_secs:.2} s for {decoded_events} records)");
    let rss_before = rss_bytes();
    let started = Instant::now();
    // As the server replays (server::open_ledger): sized first, decoded on a second thread.
    let ledger = std::cell::RefCell::new(Ledger::default());
    FileStorage::open_into(
        &path,
        |n| *ledger.borrow_mut() = Ledger::with_capacity(n, RetryPolicy::default()),
        |batch| {
            let l = ledger.borrow();
            batch.into_iter().for_each(|e| l.apply(e));
        },
    )
    .unwrap();
    let ledger = ledger.into_inner();
    let replay_secs = started.elapsed().as_secs_f64();
    let decoded = 0.0;
    let rss = rss_bytes().saturating_sub(rss_before);
    println!(
        "replay of {n} leases: {replay_secs:.2} s ({decoded:.2} s reading and decoding {:.0} MB of journal)",
        journal_bytes as f64 / 1e6
    );
    println!("RSS per live lease: {} bytes ({:.2} GB for {n})", rss / n as u64, rss as f64 / 1e9);

    // 3. Revoke-by-job and reaping with 1k vs n other leases.
    let small = Ledger::new(None, RetryPolicy::default());
    for i in 0..1_000 {
        small.apply(Event::Created { lease: Box::new(lease(i, 1_000 + (i % 3600) as i64)) });
    }
    let job_cost = |l: &Ledger, base: usize| {
        let started = Instant::now();
        for i in 0..1_000 {
            let job = format!("github:74:{}:1:{}", base + i, base + i);
            std::hint::black_box(l.live_of_job(&job, 0));
        }
        started.elapsed().as_secs_f64() / 1_000.0
    };
    let (a, b) = (job_cost(&small, 0), job_cost(&ledger, n / 2));
    println!("revoke-by-job lookup: {:.1} µs with 1k leases, {:.1} µs with {n}: ratio {:.2}", a * 1e6, b * 1e6, b / a);
    let reap_cost = |l: &Ledger| {
        let started = Instant::now();
        let due = l.due_expiries(1_000); // the leases expiring at exactly t = 1000
        (started.elapsed().as_secs_f64(), due.len())
    };
    let ((a, da), (b, db)) = (reap_cost(&small), reap_cost(&ledger));
    println!(
        "reaping due expiries: {:.1} µs per due lease with 1k leases ({da} due), {:.1} µs with {n} ({db} due): ratio {:.2}",
        a / da.max(1) as f64 * 1e6,
        b / db.max(1) as f64 * 1e6,
        (b / db.max(1) as f64) / (a / da.max(1) as f64)
    );
}
