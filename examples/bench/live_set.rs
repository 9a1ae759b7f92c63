//! Rows 11 (issue 23): the exchange under a large live set. Three brokers side by side, one
//! holding 1k live leases, one holding 1M (a compacted journal replayed at start) and the
//! control, a second 1k set up exactly as the first (`windows`), take the same open-loop load at
//! 50 % of saturation, window by window in turn. The p99 goal is judged on each side's typical
//! window; the control says how far two identical brokers differ in the same run.
//!
//! The load is what grows a broker's journal, and compaction rewrites its live set: with 1M
//! leases that is a few hundred MB of snapshot. Every broker compacts as often as it can here
//! (`compact_bytes` 1 MiB, `compact_ratio` 0.01, a reap every second). The worst case is
//! measured: before each 1M window, a few thousand exchanges (not measured) make a compaction
//! due, and the window opens once it runs, so the window is spent compacting (`/metrics` counts
//! the compactions each window overlapped). Windows take turns, and a window waits until every
//! other broker is **settled**: not compacting, not freeing a replaced journal, and still so
//! past its next reap, when a compaction made due by its last window would start. Without that,
//! the 1M broker's next compaction and the freeing of its old journal ran in the next broker's
//! window, and the baseline paid for the large live set (docs/benchmarks.md, "the control").
//! Each window also reports the exchanges over 10 ms and over 5 ms from the client's send and
//! inside the broker, its group commits per second, the time the broker's threads (but the
//! compaction's) waited on a run queue per exchange, the CPU of the machine, the broker, the
//! load generator and the other brokers, and how the exchanges over 5 ms fall over the tenths
//! of the window (the compaction's start is in the first). The priming exchanges run at the
//! window's own rate, so a window opens on the load it measures, not on a burst.
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
use crate::table::Row;
use crate::windows::{BASELINE, CONTROL, LARGE, SIDES, Windows};
use std::path::Path;
use std::time::{Duration, Instant};

const COMPACT_OFTEN: &str = "[ledger]\nreap_interval = \"1s\"\ncompact_bytes = 1048576\ncompact_ratio = 0.01\n";
/// The shipped defaults (`FileStoreOptions::default`), for the amortized charge.
const DEFAULT_COMPACT_BYTES: f64 = 64.0 * 1024.0 * 1024.0;
const DEFAULT_COMPACT_RATIO: f64 = 0.5;
/// Rounds of windows (one per side, each of `plan.open / 4` exchanges): `3 × plan.open` a side.
/// A window is shorter than a compaction of 1M leases, so each one is inside one.
const ROUNDS: usize = 12;
/// Exchanges a batch of priming sends (`prime_a_compaction`).
const PRIME_BATCH: usize = 500;

/// The figures of one broker over its windows.
#[derive(Default)]
struct Side {
    outcome: Outcome,
    /// Broker CPU seconds over the windows, the compaction threads left out.
    cpu: f64,
    compactions_seen: u64,
}

/// What `/metrics` says of the journal's compactions, its group commits, and the exchanges
/// slow inside the broker: one page, read before and after each window.
#[derive(Debug, Default, Clone, Copy)]
struct Compactions {
    total: f64,
    running: bool,
    cpu: f64,
    pause_max: f64,
    records: f64,
    snapshot_bytes: f64,
    appended: f64,
    fsyncs: f64,
    slow_inside: f64,
    over_5ms_inside: f64,
}

async fn compactions(addr: std::net::SocketAddr) -> Compactions {
    let text = metrics(addr).await;
    let value = |name: &str| crate::http::sample(&text, name);
    Compactions {
        total: value("ephemera_journal_compactions_total"),
        running: value("ephemera_journal_compacting") > 0.0,
        cpu: value("ephemera_journal_compaction_cpu_seconds_total"),
        pause_max: value("ephemera_journal_compaction_pause_seconds_max"),
        records: value("ephemera_journal_compaction_records"),
        snapshot_bytes: value("ephemera_journal_snapshot_bytes"),
        appended: value("ephemera_journal_appended_bytes_total"),
        fsyncs: value("ephemera_journal_fsyncs_total"),
        slow_inside: over_inside(&text, "0.01"),
        over_5ms_inside: over_inside(&text, "0.005"),
    }
}

/// Exchanges the broker at `addr` has timed over 10 ms inside itself since it started.
pub async fn over_10ms_inside(addr: std::net::SocketAddr) -> f64 {
    over_inside(&metrics(addr).await, "0.01")
}

/// Exchanges over `le` seconds inside the broker, from a `/metrics` page: the exchange latency
/// histogram's count less its `le` bucket.
fn over_inside(text: &str, le: &str) -> f64 {
    let sample = |name: &str| crate::http::sample(text, name);
    sample("ephemera_exchange_duration_seconds_count")
        - sample(&format!("ephemera_exchange_duration_seconds_bucket{{le=\"{le}\"}}"))
}

/// The broker's `/metrics` page.
async fn metrics(addr: std::net::SocketAddr) -> String {
    let mut conn = Conn::open(addr).await.unwrap();
    conn.send(&request("GET", "/metrics", &[], "", b"")).await.unwrap().text()
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

/// Waits until `broker` neither compacts nor frees a replaced journal (its `ephemera-unlink`
/// thread, which runs for a few tenths of a second after a compaction of 1M leases): the disk
/// and cores are then the next window's alone. Both are the compacting broker's cost, and left
/// running they landed on the next broker's window (docs/benchmarks.md, "the control").
async fn until_quiet(broker: &Broker) {
    until_compacting(broker.addr, false).await;
    let (pid, started) = (broker.pid.to_string(), Instant::now());
    while crate::procfs::has_thread(&pid, "ephemera-unlink") {
        assert!(started.elapsed() < Duration::from_secs(60), "a replaced journal still being freed after 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends batches from `primes` (unmeasured) until a compaction runs; returns how many exchanges
/// that took. A compaction made due starts at the next reap, a second later. At the window's
/// own rate and connections (`rate`, `conns`): primed at saturation (a closed loop), the window
/// opened on the tail of a burst the other windows never see, its first tenth slow in the 1M
/// windows only (`over 5 ms by tenth of the window`).
async fn prime_a_compaction(
    addr: std::net::SocketAddr,
    primes: &mut Vec<std::sync::Arc<Vec<Vec<u8>>>>,
    rate: f64,
    conns: usize,
) -> usize {
    let mut sent = 0;
    loop {
        let batch = primes.pop().expect("more priming exchanges than signed for");
        sent += batch.len();
        open_loop(addr, batch, rate, conns, 201).await.check("a compaction made due");
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            if compactions(addr).await.running {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// [`until_quiet`], and still quiet past the broker's next reap: a compaction due from appends
/// made during the last one (a window's) starts at the next reap, up to a second later, and
/// would otherwise run in the next broker's window.
async fn until_settled(broker: &Broker) {
    loop {
        until_quiet(broker).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let pid = broker.pid.to_string();
        if !compactions(broker.addr).await.running && !crate::procfs::has_thread(&pid, "ephemera-unlink") {
            return;
        }
    }
}

pub async fn run(binary: &Path, plan: &Plan, dir: &Path, big: usize) -> Vec<Row> {
    ephemera::install_crypto();
    let small = 1_000;
    let scale = if big >= 1_000_000 { format!("{}M", big / 1_000_000) } else { format!("{}k", big / 1_000) };
    let started = Instant::now();
    // In window order: baseline, large, control.
    let setups = [("small", small), ("big", big), ("control", small)];
    for (name, count) in setups {
        let ledger = dir.join(name).join("data/ledger");
        std::fs::create_dir_all(&ledger).unwrap();
        crate::ledger::write_live_journal(&ledger.join("journal"), count);
    }
    eprintln!("  wrote journals of {small}, {big} and {small} live leases in {:.1} s", started.elapsed().as_secs_f64());
    let mut tokens = Tokens::new();
    let mut take = |n: usize| requests(&tokens.take(n).1);
    let warmups: [_; SIDES] = std::array::from_fn(|_| take(plan.warmup));
    let saturation: Vec<_> = (0..SAT_ROUNDS).map(|_| take(plan.saturation / SAT_ROUNDS)).collect();
    let per_window = plan.open / 4;
    let rounds: Vec<[_; SIDES]> = (0..ROUNDS).map(|_| std::array::from_fn(|_| take(per_window))).collect();
    // Exchanges before each large window that make a compaction due (`compact_ratio` 0.01 of
    // ~350 MB is ~3,000 exchanges' appends, `compact_bytes` ~900), so that the window opens
    // with one running: batches of `PRIME_BATCH`, as many as it takes.
    let mut primes: Vec<_> = (0..ROUNDS * 12).map(|_| take(PRIME_BATCH)).collect();

    let setup = Setup::extra(COMPACT_OFTEN);
    let mut brokers = Vec::new();
    for (name, _) in setups {
        brokers.push(Broker::start_with(binary, &dir.join(name), &setup).await);
    }
    for (broker, warmup) in brokers.iter().zip(warmups) {
        closed_loop(broker.addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    }
    // The rate: the baseline's saturation, every broker settled (the 1M broker's first
    // compaction would take a share of the cores).
    for broker in &brokers {
        until_settled(broker).await;
    }
    let pid = brokers[BASELINE].pid.to_string();
    let mut measured = Vec::new();
    for round in saturation {
        let (addrs, pids) = (&[brokers[BASELINE].addr], std::slice::from_ref(&pid));
        measured.push(saturation_round("saturation, 1k live", addrs, pids, &[], round, plan.saturation_conns).await);
    }
    let (rate, _, _) = over_rounds(&measured, |r| r.rate);
    let half = rate / 2.0;

    let mut sides: [Side; SIDES] = Default::default();
    let mut windows = Windows::default();
    let mut before = Vec::new();
    for broker in &brokers {
        before.push(compactions(broker.addr).await);
    }
    let names = ["1k", scale.as_str(), "control"];
    let mut primed = 0;
    for round in rounds {
        for (i, requests) in round.into_iter().enumerate() {
            let broker = &brokers[i];
            // No other broker compacting or freeing a journal, nor about to: it would share the
            // cores and the disk with this window's load.
            for (_, other) in brokers.iter().enumerate().filter(|(j, _)| *j != i) {
                until_settled(other).await;
            }
            if i == LARGE {
                // The worst case: the window opens with a compaction of the live set running.
                primed += prime_a_compaction(broker.addr, &mut primes, half, plan.open_conns).await;
            }
            let at_start = compactions(broker.addr).await;
            let pid = broker.pid.to_string();
            let cpu = crate::procfs::cpu_without(&pid, "ephemera-compac");
            // What the other brokers (and the rest of the machine) took meanwhile, in cores.
            let others: Vec<String> =
                brokers.iter().filter(|b| b.pid != broker.pid).map(|b| b.pid.to_string()).collect();
            let (others_cpu, window_started) = (crate::procfs::cpu_of(&others), Instant::now());
            let waited = crate::procfs::runqueue_wait_without(&pid, Some("ephemera-compac"));
            let bench_waited = crate::procfs::runqueue_wait_without("self", None);
            let (all_cpu, machine, bench) =
                (crate::procfs::cpu(&pid), crate::procfs::machine_seconds().0, crate::procfs::cpu_seconds("self"));
            let requests_len = requests.len();
            let outcome = open_loop(broker.addr, requests, half, plan.open_conns, 201).await;
            let window_seconds = window_started.elapsed().as_secs_f64();
            sides[i].cpu += crate::procfs::cpu_without(&pid, "ephemera-compac").since(&cpu);
            let others_cores = crate::procfs::cpu_of(&others).since(&others_cpu) / window_seconds;
            // Where the machine's CPU went in the window: this broker (compaction included), the
            // load generator (this process), and everything else (the kernel's own threads).
            let broker_cores = crate::procfs::cpu(&pid).since(&all_cpu) / window_seconds;
            let bench_cores = (crate::procfs::cpu_seconds("self") - bench) / window_seconds;
            let machine_cores = (crate::procfs::machine_seconds().0 - machine) / window_seconds;
            outcome.check("open loop under a live set");
            let at_end = compactions(broker.addr).await;
            sides[i].compactions_seen += (at_end.total - at_start.total) as u64 + u64::from(at_end.running);
            let inside = at_end.slow_inside - at_start.slow_inside;
            let inside_5ms = at_end.over_5ms_inside - at_start.over_5ms_inside;
            let per_exchange = |seconds: f64| seconds / outcome.ok.max(1) as f64 * 1e6;
            let wait_each = per_exchange(crate::procfs::runqueue_wait_without(&pid, Some("ephemera-compac")) - waited);
            let bench_wait_each = per_exchange(crate::procfs::runqueue_wait_without("self", None) - bench_waited);
            let commits = (at_end.fsyncs - at_start.fsyncs) / window_seconds;
            let p99 = windows.add(i, &outcome.latencies);
            eprintln!(
                "  {} live: {} exchanges at {half:.0}/s, p99 {p99:.2} ms, max {:.2} ms; over 10 ms, from the client's send / inside the broker: {} / {inside:.0} (over 5 ms: {} / {inside_5ms:.0}); {commits:.0} group commits/s; run-queue wait an exchange: broker {wait_each:.1} µs, load generator {bench_wait_each:.1} µs; cores busy: machine {machine_cores:.2}, this broker {broker_cores:.2}, load generator {bench_cores:.2}, other brokers {others_cores:.2}",
                names[i],
                outcome.ok,
                sorted(&outcome.latencies).last().copied().unwrap_or(0.0) * 1e3,
                outcome.latencies.iter().filter(|l| **l > 0.010).count(),
                outcome.slow_at.len(),
            );
            // Where in the window the exchanges over 5 ms were: a count per tenth of it.
            let mut tenths = [0usize; 10];
            for at in &outcome.slow_at {
                tenths[(at * 10 / requests_len.max(1)).min(9)] += 1;
            }
            eprintln!("    over 5 ms by tenth of the window: {tenths:?}");
            sides[i].outcome.merge(outcome);
        }
    }
    let mut after = Vec::new();
    for broker in &brokers {
        until_quiet(broker).await;
        after.push(compactions(broker.addr).await);
    }
    drop(brokers);

    // Per exchange: the broker's CPU without compaction threads, plus one compaction's CPU
    // spread over the exchanges the default spacing puts between two.
    let per_exchange = |i: usize| {
        let (side, before, after) = (&sides[i], &before[i], &after[i]);
        let ok = side.outcome.ok as f64;
        let steady = side.cpu / ok;
        let done = (after.total - before.total).max(1.0);
        let one_compaction = (after.cpu - before.cpu) / done;
        let exchanges = ok + if i == LARGE { primed as f64 } else { 0.0 };
        let bytes_per_exchange = (after.appended - before.appended) / exchanges;
        let spacing = DEFAULT_COMPACT_BYTES.max(DEFAULT_COMPACT_RATIO * after.snapshot_bytes);
        let charged = one_compaction / (spacing / bytes_per_exchange);
        (steady, charged, one_compaction, bytes_per_exchange)
    };
    let (steady_small, charged_small, _, _) = per_exchange(BASELINE);
    let (steady_big, charged_big, one_big, bytes_each) = per_exchange(LARGE);
    let (steady_control, charged_control, _, _) = per_exchange(CONTROL);
    let cpu_small = steady_small + charged_small;
    let cpu_big = steady_big + charged_big;
    let [small_lat, big_lat] = [&sides[BASELINE], &sides[LARGE]].map(|s| sorted(&s.outcome.latencies));
    let max = |l: &[f64]| l.last().copied().unwrap_or(0.0) * 1e3;
    let n = sides[LARGE].outcome.ok;
    vec![
        Row::new(
            "11a",
            &format!("**exchange p99 at 50 % of saturation, {scale} live leases ÷ 1k**: the typical window's, each {scale} window opened by a compaction of the live set"),
            format!(
                "{} ({n} exchanges at {half:.0}/s; {} compactions of ~{:.0} records overlapped its windows)",
                windows.describe(LARGE),
                sides[LARGE].compactions_seen,
                after[LARGE].records
            ),
            format!("1k live: {} (same schedule, windows in turn); {}", windows.describe(BASELINE), windows.control()),
        )
        .ratio(windows.ratio())
        .goal("≤ 1.2", windows.ratio() <= 1.2),
        Row::new(
            "11b",
            &format!("**broker CPU per exchange at 50 % of saturation, {scale} live leases ÷ 1k**, compaction charged at the default spacing"),
            format!(
                "{:.0} µs = {:.0} without compaction threads + {:.1} charged (one compaction of the live set: {:.2} CPU-s every {:.0} exchanges of {:.0} B)",
                cpu_big * 1e6,
                steady_big * 1e6,
                charged_big * 1e6,
                one_big,
                DEFAULT_COMPACT_BYTES.max(DEFAULT_COMPACT_RATIO * after[LARGE].snapshot_bytes) / bytes_each,
                bytes_each
            ),
            format!(
                "1k live: {:.0} µs ({:.0} + {:.1}); control ÷ 1k: {:.2}",
                cpu_small * 1e6,
                steady_small * 1e6,
                charged_small * 1e6,
                (steady_control + charged_control) / cpu_small
            ),
        )
        .ratio(cpu_big / cpu_small)
        .goal("≤ 1.2", cpu_big / cpu_small <= 1.2),
        Row::new(
            "11c",
            &format!("**longest pause a compaction of {scale} live leases made appends (and so exchanges) wait**: its final copy and rename"),
            format!(
                "{:.2} ms (over all compactions of the run); the longest any exchange of the {scale} windows waited, from its scheduled send: {:.2} ms",
                after[LARGE].pause_max * 1e3,
                max(&big_lat)
            ),
            format!("the longest any exchange of the 1k windows waited: {:.2} ms (fsync tails and scheduling, no compaction worth the name)", max(&small_lat)),
        )
        .ratio(max(&big_lat) / max(&small_lat))
        .goal("pause ≤ 10 ms", after[LARGE].pause_max * 1e3 <= 10.0),
    ]
}

/// Latencies in ascending order, for percentiles.
pub fn sorted(latencies: &[f64]) -> Vec<f64> {
    let mut v = latencies.to_vec();
    v.sort_by(f64::total_cmp);
    v
}
