//! Rows 11 (issue 23): the exchange under a large live set. Two brokers side by side, one
//! holding 1k live leases and one holding 1M (a compacted journal replayed at start), take the
//! same open-loop load at 50 % of saturation, window by window in turn.
//!
//! The load is what grows a broker's journal, and compaction rewrites its live set: with 1M
//! leases that is a few hundred MB of snapshot. Both brokers compact as often as they can here
//! (`compact_bytes` 1 MiB, `compact_ratio` 0.01, a reap every second): within a second of a
//! window's start the 1M broker begins rewriting its live set, and begins again as soon as it is
//! done, so its windows are spent mostly compacting (`/metrics` counts the compactions each
//! window overlapped). Windows take turns; a broker's window waits until the other broker is
//! not compacting, so no compaction thread shares the cores with the other's load.
//!
//! CPU per exchange is counted without the compaction's own threads (`ephemera-compact`, /proc)
//! and then charged with the compaction's CPU spread over the exchanges between two compactions
//! at the default spacing (`compact_bytes` 64 MiB and `compact_ratio` 0.5 of the last snapshot):
//! what a broker with the shipped config pays per exchange over time. Back-to-back compactions
//! as run here would charge far more, to no one's benefit.

use crate::broker::{Broker, Setup};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens, over_rounds, requests, saturation_round};
use crate::http::{Conn, request};
use crate::load::{Outcome, closed_loop, open_loop};
use crate::table::{Row, percentile};
use std::path::Path;
use std::time::{Duration, Instant};

const COMPACT_OFTEN: &str = "[ledger]\nreap_interval = \"1s\"\ncompact_bytes = 1048576\ncompact_ratio = 0.01\n";
/// The shipped defaults (`FileStoreOptions::default`), for the amortized charge.
const DEFAULT_COMPACT_BYTES: f64 = 64.0 * 1024.0 * 1024.0;
const DEFAULT_COMPACT_RATIO: f64 = 0.5;
const ROUNDS: usize = 3;

/// The figures of one broker over its windows.
#[derive(Default)]
struct Side {
    outcome: Outcome,
    /// Broker CPU seconds over the windows, the compaction threads left out.
    cpu: f64,
    compactions_seen: u64,
}

/// What `/metrics` says of the journal's compactions.
#[derive(Debug, Default, Clone, Copy)]
struct Compactions {
    total: f64,
    running: bool,
    cpu: f64,
    pause_max: f64,
    records: f64,
    snapshot_bytes: f64,
    appended: f64,
}

async fn compactions(addr: std::net::SocketAddr) -> Compactions {
    let mut conn = Conn::open(addr).await.unwrap();
    let text = conn.send(&request("GET", "/metrics", &[], "", b"")).await.unwrap().text();
    let value = |name: &str| crate::http::sample(&text, name);
    Compactions {
        total: value("ephemera_journal_compactions_total"),
        running: value("ephemera_journal_compacting") > 0.0,
        cpu: value("ephemera_journal_compaction_cpu_seconds_total"),
        pause_max: value("ephemera_journal_compaction_pause_seconds_max"),
        records: value("ephemera_journal_compaction_records"),
        snapshot_bytes: value("ephemera_journal_snapshot_bytes"),
        appended: value("ephemera_journal_appended_bytes_total"),
    }
}

/// Polls `/metrics` until a compaction runs (`true`) or none does (`false`), for at most 60 s.
/// (A bench may wait on the wall clock; the figures never depend on how long this took.)
async fn until_compacting(addr: std::net::SocketAddr, running: bool) {
    let started = Instant::now();
    while compactions(addr).await.running != running {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no compaction {} within 60 s",
            if running { "began" } else { "ended" }
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn run(binary: &Path, plan: &Plan, dir: &Path, big: usize) -> Vec<Row> {
    ephemera::install_crypto();
    let small = 1_000;
    let scale = if big >= 1_000_000 { format!("{}M", big / 1_000_000) } else { format!("{}k", big / 1_000) };
    let started = Instant::now();
    for (name, count) in [("small", small), ("big", big)] {
        let ledger = dir.join(name).join("data/ledger");
        std::fs::create_dir_all(&ledger).unwrap();
        crate::ledger::write_live_journal(&ledger.join("journal"), count);
    }
    eprintln!("  wrote journals of {small} and {big} live leases in {:.1} s", started.elapsed().as_secs_f64());
    let mut tokens = Tokens::new();
    let warmups = [requests(&tokens.take(plan.warmup).1), requests(&tokens.take(plan.warmup).1)];
    let saturation: Vec<_> = (0..SAT_ROUNDS).map(|_| requests(&tokens.take(plan.saturation / SAT_ROUNDS).1)).collect();
    let windows: Vec<[_; 2]> =
        (0..ROUNDS).map(|_| [requests(&tokens.take(plan.open).1), requests(&tokens.take(plan.open).1)]).collect();

    let setup = Setup::extra(COMPACT_OFTEN);
    let brokers = [
        Broker::start_with(binary, &dir.join("small"), &setup).await,
        Broker::start_with(binary, &dir.join("big"), &setup).await,
    ];
    for (broker, warmup) in brokers.iter().zip(warmups) {
        closed_loop(broker.addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    }
    // The rate: the small broker's saturation (the 1M broker's first compaction runs meanwhile;
    // it is waited out before any window).
    let pid = brokers[0].pid.to_string();
    let mut rounds = Vec::new();
    for round in saturation {
        rounds.push(
            saturation_round(
                "saturation, 1k live",
                &[brokers[0].addr],
                std::slice::from_ref(&pid),
                &[],
                round,
                plan.saturation_conns,
            )
            .await,
        );
    }
    let (rate, _, _) = over_rounds(&rounds, |r| r.rate);
    let half = rate / 2.0;

    let mut sides = [Side::default(), Side::default()];
    let before = [compactions(brokers[0].addr).await, compactions(brokers[1].addr).await];
    for round in windows {
        for (i, requests) in round.into_iter().enumerate() {
            let (broker, other) = (&brokers[i], &brokers[1 - i]);
            // The other broker quiet: its compaction thread would share the cores.
            until_compacting(other.addr, false).await;
            let at_start = compactions(broker.addr).await;
            let pid = broker.pid.to_string();
            let cpu = crate::procfs::cpu_without(&pid, "ephemera-compac");
            let outcome = open_loop(broker.addr, requests, half, plan.open_conns, 201).await;
            sides[i].cpu += crate::procfs::cpu_without(&pid, "ephemera-compac").since(&cpu);
            outcome.check("open loop under a live set");
            let at_end = compactions(broker.addr).await;
            sides[i].compactions_seen += (at_end.total - at_start.total) as u64 + u64::from(at_end.running);
            eprintln!(
                "  {} live: {} exchanges at {half:.0}/s, p99 {:.2} ms, max {:.2} ms",
                if i == 0 { "1k" } else { &scale },
                outcome.ok,
                percentile(&sorted(&outcome.latencies), 0.99) * 1e3,
                sorted(&outcome.latencies).last().copied().unwrap_or(0.0) * 1e3
            );
            sides[i].outcome.merge(outcome);
        }
    }
    for broker in &brokers {
        until_compacting(broker.addr, false).await;
    }
    let after = [compactions(brokers[0].addr).await, compactions(brokers[1].addr).await];
    drop(brokers);

    // Per exchange: the broker's CPU without compaction threads, plus one compaction's CPU
    // spread over the exchanges the default spacing puts between two.
    let per_exchange = |side: &Side, before: &Compactions, after: &Compactions| {
        let ok = side.outcome.ok as f64;
        let steady = side.cpu / ok;
        let done = (after.total - before.total).max(1.0);
        let one_compaction = (after.cpu - before.cpu) / done;
        let bytes_per_exchange = (after.appended - before.appended) / ok;
        let spacing = DEFAULT_COMPACT_BYTES.max(DEFAULT_COMPACT_RATIO * after.snapshot_bytes);
        let charged = one_compaction / (spacing / bytes_per_exchange);
        (steady, charged, one_compaction, bytes_per_exchange)
    };
    let (steady_small, charged_small, _, _) = per_exchange(&sides[0], &before[0], &after[0]);
    let (steady_big, charged_big, one_big, bytes_each) = per_exchange(&sides[1], &before[1], &after[1]);
    let cpu_small = steady_small + charged_small;
    let cpu_big = steady_big + charged_big;
    let [small_lat, big_lat] = [&sides[0], &sides[1]].map(|s| sorted(&s.outcome.latencies));
    let p99 = |l: &[f64]| percentile(l, 0.99) * 1e3;
    let max = |l: &[f64]| l.last().copied().unwrap_or(0.0) * 1e3;
    let n = sides[1].outcome.ok;
    vec![
        Row::new(
            "11a",
            &format!("**exchange p99 at 50 % of saturation, {scale} live leases ÷ 1k**, each {scale} window opened by a compaction of the live set"),
            format!(
                "p99 {:.2} ms, p50 {:.2} ms ({n} exchanges at {half:.0}/s in {ROUNDS} windows; {} compactions of ~{:.0} records overlapped them)",
                p99(&big_lat),
                percentile(&big_lat, 0.5) * 1e3,
                sides[1].compactions_seen,
                after[1].records
            ),
            format!("1k live: p99 {:.2} ms, p50 {:.2} ms (same schedule, windows in turn)", p99(&small_lat), percentile(&small_lat, 0.5) * 1e3),
        )
        .ratio(p99(&big_lat) / p99(&small_lat))
        .goal("≤ 1.2", p99(&big_lat) / p99(&small_lat) <= 1.2),
        Row::new(
            "11b",
            &format!("**broker CPU per exchange at 50 % of saturation, {scale} live leases ÷ 1k**, compaction charged at the default spacing"),
            format!(
                "{:.0} µs = {:.0} without compaction threads + {:.1} charged (one compaction of the live set: {:.2} CPU-s every {:.0} exchanges of {:.0} B)",
                cpu_big * 1e6,
                steady_big * 1e6,
                charged_big * 1e6,
                one_big,
                DEFAULT_COMPACT_BYTES.max(DEFAULT_COMPACT_RATIO * after[1].snapshot_bytes) / bytes_each,
                bytes_each
            ),
            format!("1k live: {:.0} µs ({:.0} + {:.1})", cpu_small * 1e6, steady_small * 1e6, charged_small * 1e6),
        )
        .ratio(cpu_big / cpu_small)
        .goal("≤ 1.2", cpu_big / cpu_small <= 1.2),
        Row::new(
            "11c",
            &format!("**longest pause a compaction of {scale} live leases made appends (and so exchanges) wait**: its final copy and rename"),
            format!(
                "{:.2} ms (over all compactions of the run); the longest any exchange of the {scale} windows waited, from its scheduled send: {:.2} ms",
                after[1].pause_max * 1e3,
                max(&big_lat)
            ),
            format!("the longest any exchange of the 1k windows waited: {:.2} ms (fsync tails and scheduling, no compaction worth the name)", max(&small_lat)),
        )
        .ratio(max(&big_lat) / max(&small_lat))
        .goal("pause ≤ 10 ms", after[1].pause_max * 1e3 <= 10.0),
    ]
}

/// Latencies in ascending order, for percentiles.
pub fn sorted(latencies: &[f64]) -> Vec<f64> {
    let mut v = latencies.to_vec();
    v.sort_by(f64::total_cmp);
    v
}
